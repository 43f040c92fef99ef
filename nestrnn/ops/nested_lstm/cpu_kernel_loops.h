/* The forward and backward time loops, written once for REAL = float and double
 * (included twice by cpu_kernel.c; see there for the layout). */

/* A weight matrix used as GEMM operand A (column-major view: m x k), packed when possible. */
typedef struct {
    const REAL *w;
    REAL *packed; /* NULL: plain GEMM */
    int m, k, lda, full_n;
    char trans;
} SFX(operand);

/* W is row-major; trans 'T' uses W^T (m = rows of W), 'N' uses W as is (m = columns of W). */
static void SFX(operand_init)(SFX(operand) * op, const REAL *w, char trans, int m, int k,
                              int full_n) {
    op->w = w;
    op->packed = NULL;
    op->m = m;
    op->k = k;
    op->lda = trans == 'T' ? k : m;
    op->full_n = full_n;
    op->trans = trans;
#if HAS_PACKED
    if (pack_size_ptr && spack_ptr && scompute_ptr) {
        const float one = 1.0f;
        const char trans_s[2] = {trans, 0};
        op->packed = malloc(pack_size_ptr("A", &m, &full_n, &k));
        if (op->packed)
            spack_ptr("A", trans_s, &m, &full_n, &k, &one, w, &op->lda, op->packed);
    }
#endif
}

static void SFX(operand_free)(SFX(operand) * op) { free(op->packed); }

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

#define AT(ptr, j, n) ((REAL *)(ptr) + (size_t)(j) * (size_t)(n))

/* Forward over all steps. Returns 0. */
int SFX(nlstm_forward)(const nlstm_args *a) {
    const int64_t T = a->steps, B = a->batch, H = a->hidden, D = a->depth;
    const int64_t lo = a->reverse ? 1 : 0, dir = a->reverse ? -1 : 1;
    const int64_t BH = B * H, B4H = B * 4 * H, B2H = B * 2 * H;
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
                memcpy(AT(a->cells[k], jn % a->cell_slots, BH) + rows * H,
                       AT(a->cells[k], j % a->cell_slots, BH) + rows * H, tail);
        }
        if (rows == 0)
            continue;

        /* outer level: gates += h_prev W_hh^T, then its pointwise phase */
        REAL *z0 = AT(a->gates[0], t, B4H);
        SFX(operand_mul)(&w0, (int)rows, hp, 1, z0);
        for (int64_t k = 0; k < D; k++) {
            REAL *z = k == 0 ? z0 : AT(a->gates[k], ts, B4H);
            const REAL *cp = AT(a->cells[k], j % a->cell_slots, BH);
            if (k > 0) { /* gates of level k = bias + [x~ | h~] of level k-1 @ [W_ih | W_hh]^T */
                const REAL *bias = a->bias[k];
                if (bias)
                    for (int64_t b = 0; b < rows; b++)
                        memcpy(z + b * 4 * H, bias, (size_t)(4 * H) * sizeof(REAL));
                SFX(operand_mul)(&wk[k], (int)rows, AT(a->inputs[k - 1], ts, B2H), bias ? 1 : 0,
                                 z);
            }
            const int tanh_candidate = k > 0 || D == 1; /* the outer level of a nest: identity */
            const int innermost = k == D - 1;
            REAL *x = innermost ? NULL : AT(a->inputs[k], ts, B2H);
            for (int64_t b = 0; b < rows; b++) {
                REAL *zr = z + b * 4 * H;
                const REAL *cr = cp + b * H;
                REAL *xr = x ? x + b * 2 * H : NULL;
#pragma omp simd
                for (int64_t u = 0; u < 3 * H; u++)
                    zr[u] = SIGMOID(zr[u]);
                if (tanh_candidate) {
#pragma omp simd
                    for (int64_t u = 3 * H; u < 4 * H; u++)
                        zr[u] = TANH(zr[u]);
                }
                if (xr) {
#pragma omp simd
                    for (int64_t u = 0; u < H; u++) {
                        xr[u] = zr[H + u] * zr[3 * H + u];
                        xr[H + u] = zr[2 * H + u] * cr[u];
                    }
                }
            }
        }
        /* innermost cell c = f c_prev + i g, then the ascent c^{k-1} = o_k tanh(c^k), h = o tanh(c) */
        {
            const int64_t k = D - 1;
            const REAL *z = k == 0 ? z0 : AT(a->gates[k], ts, B4H);
            const REAL *cp = AT(a->cells[k], j % a->cell_slots, BH);
            REAL *cn = AT(a->cells[k], jn % a->cell_slots, BH);
            for (int64_t b = 0; b < rows; b++) {
                const REAL *zr = z + b * 4 * H;
#pragma omp simd
                for (int64_t u = 0; u < H; u++)
                    cn[b * H + u] = zr[2 * H + u] * cp[b * H + u] + zr[H + u] * zr[3 * H + u];
            }
        }
        for (int64_t k = D - 1; k >= 0; k--) {
            const REAL *z = k == 0 ? z0 : AT(a->gates[k], ts, B4H);
            const REAL *cn = AT(a->cells[k], jn % a->cell_slots, BH);
            REAL *tc = AT(a->tanh_c[k], ts, BH);
            REAL *up = k == 0 ? hn : AT(a->cells[k - 1], jn % a->cell_slots, BH);
            for (int64_t b = 0; b < rows; b++) {
                const REAL *zr = z + b * 4 * H;
#pragma omp simd
                for (int64_t u = 0; u < H; u++) {
                    const REAL th = TANH(cn[b * H + u]);
                    tc[b * H + u] = th;
                    up[b * H + u] = zr[u] * th;
                }
            }
        }
    }
    SFX(operand_free)(&w0);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_free)(&wk[k]);
    return 0;
}

/* From d(i*g) and d(f*c_prev) of one level at one step: its gate gradients (i, f, g; o is
 * already there, not yet through the sigmoid) and the gradient of its previous cell. */
static void SFX(gate_backward)(int64_t rows, int64_t H, const REAL *z, const REAL *cp,
                               const REAL *d_ig, int64_t ld_ig, const REAL *d_fc, int64_t ld_fc,
                               REAL *dz, REAL *dc_prev, int tanh_candidate) {
    for (int64_t b = 0; b < rows; b++) {
        const REAL *zr = z + b * 4 * H, *cr = cp + b * H;
        const REAL *ig = d_ig + b * ld_ig, *fc = d_fc + b * ld_fc;
        REAL *dr = dz + b * 4 * H, *dcr = dc_prev + b * H;
#pragma omp simd
        for (int64_t u = 0; u < H; u++) {
            const REAL o = zr[u], i = zr[H + u], f = zr[2 * H + u], g = zr[3 * H + u];
            dr[u] = dr[u] * o * (1 - o);
            dr[H + u] = ig[u] * g * i * (1 - i);
            dr[2 * H + u] = fc[u] * cr[u] * f * (1 - f);
            dr[3 * H + u] = tanh_candidate ? ig[u] * i * (1 - g * g) : ig[u] * i;
            dcr[u] = fc[u] * f;
        }
    }
}

/* Reverse time loop: gate gradients of every step and the gradients of h0 and c0 (weight
 * gradients are computed afterwards from d_gates). Needs the buffers of a forward with save. */
int SFX(nlstm_backward)(const nlstm_args *a) {
    const int64_t T = a->steps, B = a->batch, H = a->hidden, D = a->depth;
    const int64_t lo = a->reverse ? 1 : 0;
    const int64_t BH = B * H, B4H = B * 4 * H;
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
        /* back through the ascent: level k's o gradient, and d of its new cell (into scratch) */
        REAL *dcl = scratch;
        for (int64_t k = 0; k < D; k++) {
            const REAL *z = AT(a->gates[k], t, B4H), *tc = AT(a->tanh_c[k], t, BH);
            const REAL *grad = k == 0 ? dht : dcl;
            const REAL *dck = AT(a->dc, k, BH);
            REAL *dz = AT(a->d_gates[k], t, B4H);
            for (int64_t b = 0; b < rows; b++) {
                const REAL *zr = z + b * 4 * H;
                REAL *dr = dz + b * 4 * H;
#pragma omp simd
                for (int64_t u = 0; u < H; u++) {
                    const REAL gr = grad[b * H + u], th = tc[b * H + u];
                    dr[u] = gr * th;
                    dcl[b * H + u] = gr * zr[u] * (1 - th * th) + dck[b * H + u];
                }
            }
        }
        /* innermost: c = i g + f c_prev, so d(i g) = d(f c_prev) = dcl */
        const int64_t last = D - 1;
        SFX(gate_backward)(rows, H, AT(a->gates[last], t, B4H), AT(a->cells[last], j, BH), dcl, H,
                           dcl, H, AT(a->d_gates[last], t, B4H), AT(a->dc, last, BH), 1);
        /* descent: [d x~ | d h~] of level k-1 = level k's gate gradients @ [W_ih | W_hh] */
        for (int64_t k = D - 1; k > 0; k--) {
            SFX(operand_mul)(&wk[k], (int)rows, AT(a->d_gates[k], t, B4H), 0, scratch);
            SFX(gate_backward)(rows, H, AT(a->gates[k - 1], t, B4H), AT(a->cells[k - 1], j, BH),
                               scratch, 2 * H, scratch + H, 2 * H, AT(a->d_gates[k - 1], t, B4H),
                               AT(a->dc, k - 1, BH), k > 1);
        }
        SFX(operand_mul)(&w0, (int)rows, AT(a->d_gates[0], t, B4H), 0, dh);
    }
    SFX(operand_free)(&w0);
    for (int64_t k = 1; k < D; k++)
        SFX(operand_free)(&wk[k]);
    return 0;
}

#undef AT
