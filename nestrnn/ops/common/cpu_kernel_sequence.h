/* The time loops of the whole-sequence nested op (nlstm_forward, nlstm_backward; the layout is
 * in nlstm_kernel.h), written once for REAL = float and double, after cpu_kernel_parts.h. */

static int SFX(check_args)(const nlstm_args *a) {
    if (a->steps < 0 || a->batch < 1 || a->hidden < 1 || a->depth < 1 || !a->activations)
        return NLSTM_EINVAL;
    for (int64_t n = 0; n < 3 * a->depth; n++)
        if (a->activations[n] < 0 || a->activations[n] >= NLSTM_ACT_COUNT)
            return NLSTM_EINVAL;
    /* BLAS takes 32-bit sizes */
    if (4 * a->hidden > INT32_MAX || a->batch > INT32_MAX)
        return NLSTM_EINVAL;
    return 0;
}

#define AT(ptr, j, n) ((REAL *)(ptr) + (size_t)(j) * (size_t)(n))
/* zoneout's keep weights of state k (level k's cell, or h at k = D) at step t, row 0 */
#define ZONE(a, k, t)                                                                             \
    ((const REAL *)(a)->zoneout + (k) * (a)->zoneout_level_stride + (t) * (a)->zoneout_step_stride)

/* Level k's layer-normalisation parameters (gates weight, gates bias, cell weight, cell bias), or
 * NULL at a level without. */
static const REAL *const *SFX(level_norms)(const nlstm_args *a, int64_t k) {
    if (!a->norms || !a->norms[4 * k])
        return NULL;
    return (const REAL *const *)a->norms + 4 * k;
}

/* The backward of level k's gate normalisation at slot ts, in place on its gate gradients dz. */
static void SFX(gates_norm_backward)(const nlstm_args *a, int64_t k, int64_t ts, int64_t rows,
                                     REAL *dz) {
    const REAL *const *n = SFX(level_norms)(a, k);
    if (!n)
        return;
    const int64_t H = a->hidden, B = a->batch;
    const REAL *normed = AT(a->norm_gates[k], ts, B * 4 * H), *istd = AT(a->inv_std[k], ts, B * 5);
    REAL *const *d = (REAL *const *)a->d_norms + 4 * k;
    for (int64_t b = 0; b < rows; b++)
        SFX(normalise_row_backward)(4, H, dz + b * 4 * H, normed + b * 4 * H, istd + b * 5, n[0],
                                    d[0], d[1]);
}

/* Forward over all steps. */
int SFX(nlstm_forward)(const nlstm_args *a) {
    const int bad = SFX(check_args)(a);
    if (bad)
        return bad;
    const int64_t T = a->steps, B = a->batch, H = a->hidden, D = a->depth;
    const int64_t lo = a->reverse ? 1 : 0, dir = a->reverse ? -1 : 1;
    const int64_t BH = B * H, B4H = B * 4 * H, B2H = B * 2 * H;
    const int64_t cell_slots = a->save ? T + 1 : 2;
    const int32_t *act = a->activations; /* act[3k]: gate, act[3k+1]: candidate, act[3k+2]: cell */
    SFX(operand) w0, wk[D > 1 ? D : 1];
    SFX(operand_init)(&w0, a->w_hh0, 'T', (int)(4 * H), (int)H, (int)B);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_init)(&wk[k], a->w_nested[k], 'T', (int)(4 * H), (int)(2 * H), (int)B);

    for (int64_t s = 0; s < T; s++) {
        const int64_t t = a->reverse ? T - 1 - s : s;
        const int64_t j = t + lo, jn = j + dir;
        const int64_t ts = a->save ? t : 0; /* slot of the per-step buffers (a ring of 1) */
        const int64_t rows = a->batch_sizes ? a->batch_sizes[t] : B;
        const size_t tail = (size_t)((B - rows) * H) * sizeof(REAL);
        REAL *hp = a->h[j], *hn = a->h[jn];
        if (rows < B) { /* inactive rows carry their state */
            memcpy(hn + rows * H, hp + rows * H, tail);
            for (int64_t k = 0; k < D; k++)
                memcpy(AT(a->cells[k], jn % cell_slots, BH) + rows * H,
                       AT(a->cells[k], j % cell_slots, BH) + rows * H, tail);
        }
        if (rows == 0)
            continue;

        /* outer level: gates += h_prev W_hh^T; level k: bias + [x~ | h~] [W_ih | W_hh]^T */
        for (int64_t k = 0; k < D; k++) {
            REAL *z = AT(a->gates[k], k == 0 ? t : ts, B4H);
            if (k == 0) {
                SFX(operand_mul)(&w0, (int)rows, hp, 1, z);
            } else {
                const REAL *bias = a->bias[k];
                if (bias)
                    for (int64_t b = 0; b < rows; b++)
                        memcpy(z + b * 4 * H, bias, (size_t)(4 * H) * sizeof(REAL));
                SFX(operand_mul)(&wk[k], (int)rows, AT(a->inputs[k - 1], ts, B2H), bias ? 1 : 0,
                                 z);
            }
            const REAL *cp = AT(a->cells[k], j % cell_slots, BH);
            REAL *x = k == D - 1 ? NULL : AT(a->inputs[k], ts, B2H);
            const REAL *const *norms = SFX(level_norms)(a, k);
            for (int64_t b = 0; b < rows; b++) {
                REAL *zr = z + b * 4 * H;
                if (norms) /* each gate block normalised before its activation */
                    SFX(normalise_row)(4, H, zr, AT(a->norm_gates[k], ts, B4H) + b * 4 * H,
                                       AT(a->inv_std[k], ts, B * 5) + b * 5, norms[0], norms[1],
                                       zr);
                SFX(activate_gates)(act[3 * k], act[3 * k + 1], zr, H);
                if (x) {
                    const REAL *cr = cp + b * H;
                    REAL *xr = x + b * 2 * H;
#pragma omp simd
                    for (int64_t u = 0; u < H; u++) {
                        xr[u] = zr[u] * zr[2 * H + u];     /* x~ = i * g */
                        xr[H + u] = zr[H + u] * cr[u];     /* h~ = f * c_prev */
                    }
                }
            }
        }
        /* innermost cell c = f c_prev + i g, then the ascent c^{k-1} = o_k act_k(c^k), h */
        {
            const int64_t k = D - 1;
            const REAL *z = AT(a->gates[k], k == 0 ? t : ts, B4H);
            const REAL *cp = AT(a->cells[k], j % cell_slots, BH);
            REAL *cn = AT(a->cells[k], jn % cell_slots, BH);
            for (int64_t b = 0; b < rows; b++) {
                const REAL *zr = z + b * 4 * H;
#pragma omp simd
                for (int64_t u = 0; u < H; u++)
                    cn[b * H + u] = zr[H + u] * cp[b * H + u] + zr[u] * zr[2 * H + u];
            }
        }
        for (int64_t k = D - 1; k >= 0; k--) {
            const REAL *z = AT(a->gates[k], k == 0 ? t : ts, B4H);
            const REAL *cn = AT(a->cells[k], jn % cell_slots, BH);
            REAL *ac = AT(a->act_cells[k], ts, BH);
            REAL *up = k == 0 ? hn : AT(a->cells[k - 1], jn % cell_slots, BH);
            const REAL *const *norms = SFX(level_norms)(a, k);
            if (!norms) {
                SFX(output)(rows, H, act[3 * k + 2], z, cn, ac, up); /* up = o_k act_k(c^k) */
                continue;
            }
            /* up = o_k act_k(LN(c^k)); the cell carried stays unnormalised */
            for (int64_t b = 0; b < rows; b++)
                SFX(normalise_row)(1, H, cn + b * H, AT(a->norm_cells[k], ts, BH) + b * H,
                                   AT(a->inv_std[k], ts, B * 5) + b * 5 + 4, norms[2], norms[3],
                                   ac + b * H);
            SFX(activate)(act[3 * k + 2], ac, rows * H);
            for (int64_t b = 0; b < rows; b++) {
                const REAL *o = z + b * 4 * H + 3 * H;
#pragma omp simd
                for (int64_t u = 0; u < H; u++)
                    up[b * H + u] = o[u] * ac[b * H + u];
            }
        }
        if (a->zoneout) /* mix what is carried past the step, after the ascent read it unzoned */
            for (int64_t k = 0; k <= D; k++) {
                const REAL *prev = k < D ? AT(a->cells[k], j % cell_slots, BH) : hp;
                REAL *next = k < D ? AT(a->cells[k], jn % cell_slots, BH) : hn;
                SFX(zoneout_mix)(rows, H, ZONE(a, k, t), a->zoneout_row_stride, prev, next);
            }
    }
    SFX(operand_free)(&w0);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_free)(&wk[k]);
    return 0;
}

/* Reverse time loop: gate gradients of every step and the gradients of h0 and c0 (parameter
 * gradients are computed afterwards from d_gates). Needs the buffers of a forward with save. */
int SFX(nlstm_backward)(const nlstm_args *a) {
    const int bad = SFX(check_args)(a);
    if (bad)
        return bad;
    if (!a->save)
        return NLSTM_EINVAL;
    const int64_t T = a->steps, B = a->batch, H = a->hidden, D = a->depth;
    const int64_t lo = a->reverse ? 1 : 0;
    const int64_t BH = B * H, B4H = B * 4 * H;
    const int32_t *act = a->activations;
    REAL *dh = a->dh, *dht = a->dht, *scratch = a->scratch;
    SFX(operand) w0, wk[D > 1 ? D : 1];
    SFX(operand_init)(&w0, a->w_hh0, 'N', (int)H, (int)(4 * H), (int)B);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_init)(&wk[k], a->w_nested[k], 'N', (int)(2 * H), (int)(4 * H), (int)B);

    for (int64_t s = 0; s < T; s++) {
        const int64_t t = a->reverse ? s : T - 1 - s;
        const int64_t j = t + lo;
        const int64_t rows = a->batch_sizes ? a->batch_sizes[t] : B;
        if (rows == 0)
            continue;
        const REAL *dout = AT(a->d_out, t, BH);
        if (!a->zoneout) {
            for (int64_t e = 0; e < rows * H; e++)
                dht[e] = dout[e] + dh[e];
        } else { /* h = z h_prev + (1 - z) h_new: dht for h_new, dh keeps h_prev's share */
            for (int64_t b = 0; b < rows; b++) {
                const REAL *zr = ZONE(a, D, t) + b * a->zoneout_row_stride;
#pragma omp simd
                for (int64_t u = 0; u < H; u++) {
                    const REAL g = dout[b * H + u] + dh[b * H + u];
                    dht[b * H + u] = (1 - zr[u]) * g;
                    dh[b * H + u] = zr[u] * g;
                }
            }
        }
        /* back through the ascent: level k's o gradient (by its activated value), and the
         * gradient of its new cell (into scratch, used as (rows, H)) */
        REAL *d_cell = scratch;
        for (int64_t k = 0; k < D; k++) {
            const REAL *z = AT(a->gates[k], t, B4H), *ac = AT(a->act_cells[k], t, BH);
            const REAL *grad = k == 0 ? dht : d_cell;
            REAL *d_carried = AT(a->dc, k, BH);
            REAL *dz = AT(a->d_gates[k], t, B4H);
            for (int64_t b = 0; b < rows; b++) {
                const REAL *zr = z + b * 4 * H;
                REAL *dr = dz + b * 4 * H;
#pragma omp simd
                for (int64_t u = 0; u < H; u++) {
                    const REAL gr = grad[b * H + u];
                    dr[3 * H + u] = gr * ac[b * H + u];
                    d_cell[b * H + u] = gr * zr[3 * H + u];
                }
            }
            SFX(times_derivative)(act[3 * k + 2], ac, d_cell, rows * H);
            const REAL *const *norms = SFX(level_norms)(a, k);
            if (norms) { /* back through the cell's normalisation */
                const REAL *normed = AT(a->norm_cells[k], t, BH);
                const REAL *istd = AT(a->inv_std[k], t, B * 5);
                REAL *const *d = (REAL *const *)a->d_norms + 4 * k;
                for (int64_t b = 0; b < rows; b++)
                    SFX(normalise_row_backward)(1, H, d_cell + b * H, normed + b * H,
                                                istd + b * 5 + 4, norms[2], d[2], d[3]);
            }
            if (!a->zoneout) {
#pragma omp simd
                for (int64_t e = 0; e < rows * H; e++)
                    d_cell[e] += d_carried[e]; /* plus the gradient carried from the next step */
            } else { /* the new cell's share; the previous cell's stays in dc for the descent */
                for (int64_t b = 0; b < rows; b++) {
                    const REAL *zr = ZONE(a, k, t) + b * a->zoneout_row_stride;
                    REAL *dr = d_cell + b * H, *cr = d_carried + b * H;
#pragma omp simd
                    for (int64_t u = 0; u < H; u++) {
                        dr[u] += (1 - zr[u]) * cr[u];
                        cr[u] *= zr[u];
                    }
                }
            }
        }
        /* innermost: c = i g + f c_prev, so d(i g) = d(f c_prev) = d_cell */
        const int64_t last = D - 1;
        SFX(gate_backward)(rows, H, act + 3 * last, AT(a->gates[last], t, B4H),
                           AT(a->cells[last], j, BH), d_cell, H, d_cell, H,
                           AT(a->d_gates[last], t, B4H), AT(a->dc, last, BH), a->zoneout != NULL);
        SFX(gates_norm_backward)(a, last, t, rows, AT(a->d_gates[last], t, B4H));
        /* descent: [d x~ | d h~] of level k-1 = level k's gate gradients @ [W_ih | W_hh] */
        for (int64_t k = D - 1; k > 0; k--) {
            SFX(operand_mul)(&wk[k], (int)rows, AT(a->d_gates[k], t, B4H), 0, scratch);
            SFX(gate_backward)(rows, H, act + 3 * (k - 1), AT(a->gates[k - 1], t, B4H),
                               AT(a->cells[k - 1], j, BH), scratch, 2 * H, scratch + H, 2 * H,
                               AT(a->d_gates[k - 1], t, B4H), AT(a->dc, k - 1, BH),
                               a->zoneout != NULL);
            SFX(gates_norm_backward)(a, k - 1, t, rows, AT(a->d_gates[k - 1], t, B4H));
        }
        /* with zoneout dh holds h_prev's share already */
        SFX(operand_mul)(&w0, (int)rows, AT(a->d_gates[0], t, B4H), a->zoneout ? 1 : 0, dh);
    }
    SFX(operand_free)(&w0);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_free)(&wk[k]);
    return 0;
}

#undef AT
#undef ZONE
