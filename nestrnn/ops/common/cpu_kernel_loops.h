/* The forward and backward time loops, written once for REAL = float and double
 * (included twice by cpu_kernel.c; see there for the layout). */

/* A weight matrix used as GEMM operand A (column-major view: m x k), packed when possible. */
typedef struct {
    const REAL *w;
    REAL *packed; /* NULL: plain GEMM */
    size_t packed_size;
    int m, k, lda, full_n;
    char trans;
} SFX(operand);

/* W is row-major; trans 'T' uses W^T (m = rows of W), 'N' uses W as is (m = columns of W). */
static void SFX(operand_init)(SFX(operand) * op, const REAL *w, char trans, int m, int k,
                              int full_n) {
    op->w = w;
    op->packed = NULL;
    op->packed_size = 0;
    op->m = m;
    op->k = k;
    op->lda = trans == 'T' ? k : m;
    op->full_n = full_n;
    op->trans = trans;
#if HAS_PACKED
    if (pack_size_ptr && spack_ptr && scompute_ptr) {
        const float one = 1.0f;
        const char trans_s[2] = {trans, 0};
        op->packed_size = pack_size_ptr("A", &m, &full_n, &k);
        op->packed = pool_take(&op->packed_size);
        if (op->packed) /* without memory for the packed copy the plain GEMM runs */
            spack_ptr("A", trans_s, &m, &full_n, &k, &one, w, &op->lda, op->packed);
    }
#endif
}

static void SFX(operand_free)(SFX(operand) * op) { pool_give(op->packed, op->packed_size); }

/* Row-major out (n, m) = beta * out + b (n, k) @ op^T, i.e. column-major out^T = A b^T. */
static void SFX(operand_mul)(const SFX(operand) * op, int n, const REAL *b, REAL beta, REAL *out) {
    const REAL one = 1;
    const int m = op->m, k = op->k;
#if HAS_PACKED
    /* the packed form is only used at the row count it was packed for */
    if (op->packed && n == op->full_n) {
        scompute_ptr("P", "N", &m, &n, &k, op->packed, &op->lda, b, &k, &beta, out, &m);
        return;
    }
#endif
    const char trans_s[2] = {op->trans, 0};
    GEMM(trans_s, "N", &m, &n, &k, &one, op->w, &op->lda, b, &k, &beta, out, &m);
}

/* v[u] = act(v[u]) for u < n; one loop per activation, so that each vectorises. */
static void SFX(activate)(int code, REAL *v, int64_t n) {
    switch (code) {
    case ACT_SIGMOID:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = SIGMOID(v[u]);
        break;
    case ACT_TANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = TANH(v[u]);
        break;
    case ACT_RELU:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = v[u] > 0 ? v[u] : 0;
        break;
    case ACT_HARDTANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = v[u] < -1 ? -1 : (v[u] > 1 ? 1 : v[u]);
        break;
    case ACT_SOFTSIGN:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = v[u] / (1 + ABS(v[u]));
        break;
    default: /* ACT_IDENTITY */
        break;
    }
}

/* g[u] *= act'(x[u]), written in terms of the output y[u] = act(x[u]). */
static void SFX(times_derivative)(int code, const REAL *y, REAL *g, int64_t n) {
    switch (code) {
    case ACT_SIGMOID:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] *= y[u] * (1 - y[u]);
        break;
    case ACT_TANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] *= 1 - y[u] * y[u];
        break;
    case ACT_RELU:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] = y[u] > 0 ? g[u] : 0;
        break;
    case ACT_HARDTANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] = (y[u] > -1 && y[u] < 1) ? g[u] : 0;
        break;
    case ACT_SOFTSIGN:
#pragma omp simd
        for (int64_t u = 0; u < n; u++) {
            const REAL s = 1 - ABS(y[u]);
            g[u] *= s * s;
        }
        break;
    default: /* ACT_IDENTITY */
        break;
    }
}

/* One row of a level's gates, z = [i, f, g, o] (4H), activated in place. */
static void SFX(activate_gates)(int32_t gate, int32_t cand, REAL *z, int64_t H) {
    SFX(activate)(gate, z, 2 * H);     /* i, f */
    SFX(activate)(cand, z + 2 * H, H); /* g */
    SFX(activate)(gate, z + 3 * H, H); /* o */
}

/* h = o * act(c) of one step (z its gates); act_c = act(c) */
static void SFX(output)(int64_t rows, int64_t H, int32_t cell, const REAL *z, const REAL *c,
                        REAL *act_c, REAL *h) {
    memcpy(act_c, c, (size_t)(rows * H) * sizeof(REAL));
    SFX(activate)(cell, act_c, rows * H);
    for (int64_t b = 0; b < rows; b++) {
        const REAL *o = z + b * 4 * H + 3 * H;
#pragma omp simd
        for (int64_t u = 0; u < H; u++)
            h[b * H + u] = o[u] * act_c[b * H + u];
    }
}

static int SFX(check_args)(const nlstm_args *a) {
    if (a->steps < 0 || a->batch < 1 || a->hidden < 1 || a->depth < 1 || !a->activations)
        return NLSTM_EINVAL;
    for (int64_t n = 0; n < 3 * a->depth; n++)
        if (a->activations[n] < 0 || a->activations[n] >= ACT_COUNT)
            return NLSTM_EINVAL;
    /* BLAS takes 32-bit sizes */
    if (4 * a->hidden > INT32_MAX || a->batch > INT32_MAX)
        return NLSTM_EINVAL;
    return 0;
}

#define AT(ptr, j, n) ((REAL *)(ptr) + (size_t)(j) * (size_t)(n))

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
            for (int64_t b = 0; b < rows; b++) {
                REAL *zr = z + b * 4 * H;
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
            SFX(output)(rows, H, act[3 * k + 2], z, cn, ac, up); /* up = o_k act_k(c^k) */
        }
    }
    SFX(operand_free)(&w0);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_free)(&wk[k]);
    return 0;
}

/* From d(i*g) and d(f*c_prev) of one level at one step: its gate gradients (o's gradient by its
 * activated value is already in place) and the gradient of its previous cell. */
static void SFX(gate_backward)(int64_t rows, int64_t H, const int32_t *act, const REAL *z,
                               const REAL *cp, const REAL *d_ig, int64_t ld_ig, const REAL *d_fc,
                               int64_t ld_fc, REAL *dz, REAL *dc_prev) {
    for (int64_t b = 0; b < rows; b++) {
        const REAL *zr = z + b * 4 * H, *cr = cp + b * H;
        const REAL *ig = d_ig + b * ld_ig, *fc = d_fc + b * ld_fc;
        REAL *dr = dz + b * 4 * H, *dcr = dc_prev + b * H;
#pragma omp simd
        for (int64_t u = 0; u < H; u++) {
            const REAL i = zr[u], f = zr[H + u], g = zr[2 * H + u];
            dr[u] = ig[u] * g;
            dr[H + u] = fc[u] * cr[u];
            dr[2 * H + u] = ig[u] * i;
            dcr[u] = fc[u] * f;
        }
        SFX(times_derivative)(act[0], zr, dr, 2 * H);                 /* i, f */
        SFX(times_derivative)(act[1], zr + 2 * H, dr + 2 * H, H);     /* g */
        SFX(times_derivative)(act[0], zr + 3 * H, dr + 3 * H, H);     /* o */
    }
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
        for (int64_t e = 0; e < rows * H; e++)
            dht[e] = dout[e] + dh[e];
        /* back through the ascent: level k's o gradient (by its activated value), and the
         * gradient of its new cell (into scratch, used as (rows, H)) */
        REAL *d_cell = scratch;
        for (int64_t k = 0; k < D; k++) {
            const REAL *z = AT(a->gates[k], t, B4H), *ac = AT(a->act_cells[k], t, BH);
            const REAL *grad = k == 0 ? dht : d_cell;
            const REAL *d_carried = AT(a->dc, k, BH);
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
#pragma omp simd
            for (int64_t e = 0; e < rows * H; e++)
                d_cell[e] += d_carried[e]; /* plus the gradient carried from the next step */
        }
        /* innermost: c = i g + f c_prev, so d(i g) = d(f c_prev) = d_cell */
        const int64_t last = D - 1;
        SFX(gate_backward)(rows, H, act + 3 * last, AT(a->gates[last], t, B4H),
                           AT(a->cells[last], j, BH), d_cell, H, d_cell, H, AT(a->d_gates[last], t, B4H),
                           AT(a->dc, last, BH));
        /* descent: [d x~ | d h~] of level k-1 = level k's gate gradients @ [W_ih | W_hh] */
        for (int64_t k = D - 1; k > 0; k--) {
            SFX(operand_mul)(&wk[k], (int)rows, AT(a->d_gates[k], t, B4H), 0, scratch);
            SFX(gate_backward)(rows, H, act + 3 * (k - 1), AT(a->gates[k - 1], t, B4H),
                               AT(a->cells[k - 1], j, BH), scratch, 2 * H, scratch + H, 2 * H,
                               AT(a->d_gates[k - 1], t, B4H), AT(a->dc, k - 1, BH));
        }
        SFX(operand_mul)(&w0, (int)rows, AT(a->d_gates[0], t, B4H), 0, dh);
    }
    SFX(operand_free)(&w0);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_free)(&wk[k]);
    return 0;
}

#undef AT

/* ---------------------------------------------------------------------------------------------
 * One step of the outer LSTM around a memory function written in Python (ops/outer_lstm): the
 * recurrent GEMM and the pointwise math before the memory function, and their backward. ``rows``
 * (B, 4H) tiles are row-major; z holds the step's input projection on entry to outer_gates, its
 * activated gates afterwards. The weight is a matrix made once per sequence by nlstm_matrix_new
 * (packed where MKL's packed GEMM is there). Codes as in the loops above.
 *
 * The input projection in z comes without the bias, which the forward steps add (bias NULL: no
 * bias): a broadcast copy of it over all steps would cost more. Where in_size > 0 there is no
 * input projection in z: the forward steps' GEMM does it, z = [x | h] [W_ih | W_hh]^T with the
 * matrix [W_ih | W_hh]^T (the steps stage [x | h] in xh, which the weight gradient reads); else
 * z += h W_hh^T, and xh holds h alone. The backward steps write the
 * bias gradient of their step (db, (4H,), unless NULL), and they can also compute the step's
 * input gradient dx = dz W_ih (I = in_size columns) in the same GEMM as dh = dz W_hh, while dz
 * is in cache: then their matrix is [W_hh | W_ih] (4H, H + I) and ``wide`` a buffer of
 * (rows, H + I); with dx NULL it is W_hh.
 * ------------------------------------------------------------------------------------------- */

/* A GEMM operand kept across calls (see SFX(operand)); freed by nlstm_matrix_free. */
void *SFX(nlstm_matrix_new)(const REAL *w, int32_t transposed, int64_t m, int64_t k,
                            int64_t full_n) {
    if (m < 1 || k < 1 || full_n < 1 || m > INT32_MAX || k > INT32_MAX || full_n > INT32_MAX)
        return NULL;
    SFX(operand) *op = malloc(sizeof *op);
    if (op)
        SFX(operand_init)(op, w, transposed ? 'T' : 'N', (int)m, (int)k, (int)full_n);
    return op;
}

void SFX(nlstm_matrix_free)(void *op) {
    if (op) {
        SFX(operand_free)((SFX(operand) *)op);
        free(op);
    }
}

/* xh = [x | h] (rows, in_size + H), x's part only where in_size > 0 */
static void SFX(stage_input)(int64_t rows, int64_t H, int64_t in_size, const REAL *x,
                             const REAL *h, REAL *xh) {
    const int64_t k = in_size + H;
    for (int64_t b = 0; b < rows; b++) {
        if (in_size)
            memcpy(xh + b * k, x + b * in_size, (size_t)in_size * sizeof(REAL));
        memcpy(xh + b * k + in_size, h + b * H, (size_t)H * sizeof(REAL));
    }
}

static int SFX(forward_matrix_ok)(const void *w, int64_t H, int64_t in_size, int64_t rows,
                                  const REAL *x) {
    const SFX(operand) *op = (const SFX(operand) *)w;
    return op && rows >= 1 && rows <= INT32_MAX && in_size >= 0 && (!in_size || x) &&
           op->m == 4 * H && op->k == in_size + H;
}

/* z = xh [W_ih | W_hh]^T + bias (in_size > 0) or z += xh W_hh^T + bias; activate; gc = f * c_prev,
 * gi = i * g and, unless o is NULL, o = the output gate */
static void SFX(gates_step)(int64_t rows, int64_t H, int32_t gate, int32_t cand, const void *w,
                            const REAL *bias, int64_t in_size, const REAL *xh, REAL *z,
                            const REAL *c_prev, REAL *gc, REAL *gi, REAL *o) {
    /* with the input projection: z = bias, then z += xh W^T (a GEMM with beta = 0 would first
     * clear z in a pass of its own) */
    const int bias_first = in_size && bias;
    if (bias_first)
        for (int64_t b = 0; b < rows; b++)
            memcpy(z + b * 4 * H, bias, (size_t)(4 * H) * sizeof(REAL));
    SFX(operand_mul)((const SFX(operand) *)w, (int)rows, xh, in_size && !bias ? 0 : 1, z);
    for (int64_t b = 0; b < rows; b++) {
        REAL *zr = z + b * 4 * H;
        if (bias && !bias_first)
#pragma omp simd
            for (int64_t u = 0; u < 4 * H; u++)
                zr[u] += bias[u];
        SFX(activate_gates)(gate, cand, zr, H);
#pragma omp simd
        for (int64_t u = 0; u < H; u++) {
            gc[b * H + u] = zr[H + u] * c_prev[b * H + u];
            gi[b * H + u] = zr[u] * zr[2 * H + u];
        }
        if (o)
            memcpy(o + b * H, zr + 3 * H, (size_t)H * sizeof(REAL));
    }
}

/* dh = dz W_hh (rows, H) and, unless dx is NULL, dx = dz W_ih (rows, I), by one GEMM into wide */
static int SFX(input_grads)(const void *matrix, int64_t rows, int64_t H, int64_t in_size,
                            const REAL *dz, REAL *dh, REAL *dx, REAL *wide) {
    const SFX(operand) *op = (const SFX(operand) *)matrix;
    if (op->m != H + (dx ? in_size : 0) || (dx && (in_size < 1 || !wide)))
        return NLSTM_EINVAL;
    if (!dx) {
        SFX(operand_mul)(op, (int)rows, dz, 0, dh);
        return 0;
    }
    SFX(operand_mul)(op, (int)rows, dz, 0, wide);
    for (int64_t b = 0; b < rows; b++) {
        const REAL *row = wide + b * (H + in_size);
        memcpy(dh + b * H, row, (size_t)H * sizeof(REAL));
        memcpy(dx + b * in_size, row + H, (size_t)in_size * sizeof(REAL));
    }
    return 0;
}

/* The gates of a step from h (and x where in_size > 0), through the staging buffer xh */
int SFX(nlstm_outer_gates)(int64_t rows, int64_t H, int32_t gate, int32_t cand, const void *w,
                            const REAL *bias, int64_t in_size, const REAL *x, const REAL *h,
                            REAL *xh, REAL *z, const REAL *c_prev, REAL *gc, REAL *gi, REAL *o) {
    if (!SFX(forward_matrix_ok)(w, H, in_size, rows, x))
        return NLSTM_EINVAL;
    SFX(stage_input)(rows, H, in_size, x, h, xh);
    SFX(gates_step)(rows, H, gate, cand, w, bias, in_size, xh, z, c_prev, gc, gi, o);
    return 0;
}

/* db = the sum of dz's rows, unless db is NULL */
static void SFX(bias_grad)(int64_t rows, int64_t H, const REAL *dz, REAL *db) {
    if (!db)
        return;
    memcpy(db, dz, (size_t)(4 * H) * sizeof(REAL));
    for (int64_t b = 1; b < rows; b++)
#pragma omp simd
        for (int64_t u = 0; u < 4 * H; u++)
            db[u] += dz[b * 4 * H + u];
}

/* from the gradients of gc = f * c_prev, gi = i * g and o (by their values): the pre-activation
 * gradients of i, f, g and o (into dz), dc_prev = d(gc) * f, dh_prev = dz W_hh and, unless NULL,
 * the bias gradient db and dx = dz W_ih (see above) */
int SFX(nlstm_outer_gates_backward)(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                     const void *w_hh, const REAL *z, const REAL *c_prev,
                                     const REAL *d_gc, const REAL *d_gi, const REAL *d_o, REAL *dz,
                                     REAL *dc_prev, REAL *dh_prev, REAL *db, int64_t in_size,
                                     REAL *dx, REAL *wide) {
    if (!w_hh || rows < 1 || rows > INT32_MAX)
        return NLSTM_EINVAL;
    const int32_t act[2] = {gate, cand};
    if (d_o) /* else the o gradient (by value) is in dz already, from outer_transition_backward */
        for (int64_t b = 0; b < rows; b++)
            memcpy(dz + b * 4 * H + 3 * H, d_o + b * H, (size_t)H * sizeof(REAL));
    SFX(gate_backward)(rows, H, act, z, c_prev, d_gi, H, d_gc, H, dz, dc_prev);
    SFX(bias_grad)(rows, H, dz, db);
    return SFX(input_grads)(w_hh, rows, H, in_size, dz, dh_prev, dx, wide);
}

/* The step after the memory function, when every row is active: this step's output
 * h = o * act(c), then the next step's outer_gates from it and x_next (z_next, xh_next, and gc, gi
 * of the next memory call). */
int SFX(nlstm_outer_transition)(int64_t rows, int64_t H, int32_t gate, int32_t cand, int32_t cell,
                                 const void *w, const REAL *bias, int64_t in_size, const REAL *z,
                                 const REAL *c, REAL *act_c, REAL *h, const REAL *x_next,
                                 REAL *xh_next, REAL *z_next, REAL *gc, REAL *gi) {
    if (!SFX(forward_matrix_ok)(w, H, in_size, rows, x_next))
        return NLSTM_EINVAL;
    SFX(output)(rows, H, cell, z, c, act_c, h);
    SFX(stage_input)(rows, H, in_size, x_next, h, xh_next);
    SFX(gates_step)(rows, H, gate, cand, w, bias, in_size, xh_next, z_next, c, gc, gi, NULL);
    return 0;
}

/* The last step's output h = o * act(c). */
int SFX(nlstm_outer_output)(int64_t rows, int64_t H, int32_t cell, const REAL *z, const REAL *c,
                             REAL *act_c, REAL *h) {
    if (rows < 1)
        return NLSTM_EINVAL;
    SFX(output)(rows, H, cell, z, c, act_c, h);
    return 0;
}

/* From d h (the output's own gradient, in d_h_total on entry): the o gradient by value (into
 * dz) and d c = d h * o * act'(c), added to d_cell. */
static void SFX(output_backward)(int64_t rows, int64_t H, int32_t cell, const REAL *z,
                                 const REAL *act_c, REAL *d_h_total, REAL *dz, REAL *d_cell) {
    for (int64_t b = 0; b < rows; b++) {
        const REAL *o = z + b * 4 * H + 3 * H;
        REAL *d_o = dz + b * 4 * H + 3 * H, *dh = d_h_total + b * H;
#pragma omp simd
        for (int64_t u = 0; u < H; u++) {
            d_o[u] = dh[u] * act_c[b * H + u];
            dh[u] *= o[u];
        }
    }
    SFX(times_derivative)(cell, act_c, d_h_total, rows * H);
#pragma omp simd
    for (int64_t e = 0; e < rows * H; e++)
        d_cell[e] += d_h_total[e];
}

/* Backward of outer_transition: the next step's gate gradients (dz_next, whose o part holds its
 * gradient by value) and bias gradient (db_next, unless NULL), d h = d_h + dz_next W_hh (in
 * scratch, (rows, H)), unless dx_next is NULL the next step's input gradient (see above), this
 * step's o gradient by value (dz) and the gradient of c,
 * d_cell = d(gc) * f_next + d h * o * act'(c). */
int SFX(nlstm_outer_transition_backward)(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                          int32_t cell, const void *w_hh, const REAL *z,
                                          const REAL *act_c, const REAL *z_next, const REAL *c,
                                          const REAL *d_h, const REAL *d_gc, const REAL *d_gi,
                                          REAL *dz, REAL *dz_next, REAL *d_cell, REAL *scratch,
                                          REAL *db_next, int64_t in_size, REAL *dx_next,
                                          REAL *wide) {
    if (!w_hh || rows < 1 || rows > INT32_MAX)
        return NLSTM_EINVAL;
    const int32_t act[2] = {gate, cand};
    SFX(gate_backward)(rows, H, act, z_next, c, d_gi, H, d_gc, H, dz_next, d_cell);
    SFX(bias_grad)(rows, H, dz_next, db_next);
    const int bad = SFX(input_grads)(w_hh, rows, H, in_size, dz_next, scratch, dx_next, wide);
    if (bad)
        return bad;
#pragma omp simd
    for (int64_t e = 0; e < rows * H; e++)
        scratch[e] += d_h[e];
    SFX(output_backward)(rows, H, cell, z, act_c, scratch, dz, d_cell);
    return 0;
}

/* Backward of outer_output (d_h is overwritten). */
int SFX(nlstm_outer_output_backward)(int64_t rows, int64_t H, int32_t cell, const REAL *z,
                                      const REAL *act_c, REAL *d_h, REAL *dz, REAL *d_cell) {
    if (rows < 1)
        return NLSTM_EINVAL;
    memset(d_cell, 0, (size_t)(rows * H) * sizeof(REAL));
    SFX(output_backward)(rows, H, cell, z, act_c, d_h, dz, d_cell);
    return 0;
}
