/* The parts that both the sequence loops (cpu_kernel_sequence.h) and the outer steps
 * (cpu_kernel_steps.h) are made of: the GEMM operand and the pointwise math of a level's gates,
 * written once for REAL = float and double (included twice by cpu_kernel.c). */

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
    case NLSTM_ACT_SIGMOID:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = SIGMOID(v[u]);
        break;
    case NLSTM_ACT_TANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = TANH(v[u]);
        break;
    case NLSTM_ACT_RELU:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = v[u] > 0 ? v[u] : 0;
        break;
    case NLSTM_ACT_HARDTANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = v[u] < -1 ? -1 : (v[u] > 1 ? 1 : v[u]);
        break;
    case NLSTM_ACT_SOFTSIGN:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            v[u] = v[u] / (1 + ABS(v[u]));
        break;
    default: /* NLSTM_ACT_IDENTITY */
        break;
    }
}

/* g[u] *= act'(x[u]), written in terms of the output y[u] = act(x[u]). */
static void SFX(times_derivative)(int code, const REAL *y, REAL *g, int64_t n) {
    switch (code) {
    case NLSTM_ACT_SIGMOID:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] *= y[u] * (1 - y[u]);
        break;
    case NLSTM_ACT_TANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] *= 1 - y[u] * y[u];
        break;
    case NLSTM_ACT_RELU:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] = y[u] > 0 ? g[u] : 0;
        break;
    case NLSTM_ACT_HARDTANH:
#pragma omp simd
        for (int64_t u = 0; u < n; u++)
            g[u] = (y[u] > -1 && y[u] < 1) ? g[u] : 0;
        break;
    case NLSTM_ACT_SOFTSIGN:
#pragma omp simd
        for (int64_t u = 0; u < n; u++) {
            const REAL s = 1 - ABS(y[u]);
            g[u] *= s * s;
        }
        break;
    default: /* NLSTM_ACT_IDENTITY */
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


/* Layer normalisation of one row of ``blocks`` parts of H (eps 1e-5, levels.LAYER_NORM_EPS):
 * xhat = (v - mean) / sigma of each part into normed, 1/sigma into istd[part], and
 * out = xhat * weight + bias (out may be v). */
static void SFX(normalise_row)(int64_t blocks, int64_t H, const REAL *v, REAL *normed, REAL *istd,
                               const REAL *weight, const REAL *bias, REAL *out) {
    for (int64_t p = 0; p < blocks; p++) {
        const REAL *vp = v + p * H;
        REAL *np = normed + p * H;
        REAL mean = 0, var = 0;
        /* the reductions vectorised (a serial sum is a chain of dependent adds) */
#pragma omp simd reduction(+ : mean)
        for (int64_t u = 0; u < H; u++)
            mean += vp[u];
        mean /= (REAL)H;
#pragma omp simd reduction(+ : var)
        for (int64_t u = 0; u < H; u++) {
            const REAL d = vp[u] - mean;
            var += d * d;
        }
        const REAL rstd = 1 / SQRT(var / (REAL)H + (REAL)1e-5);
        istd[p] = rstd;
#pragma omp simd
        for (int64_t u = 0; u < H; u++)
            np[u] = (vp[u] - mean) * rstd;
    }
    const int64_t n = blocks * H;
#pragma omp simd
    for (int64_t u = 0; u < n; u++)
        out[u] = normed[u] * weight[u] + bias[u];
}

/* Backward of normalise_row in place: g (blocks * H), the gradient of its output, becomes that of
 * its input; d_weight and d_bias get the row's share added. */
static void SFX(normalise_row_backward)(int64_t blocks, int64_t H, REAL *g, const REAL *normed,
                                        const REAL *istd, const REAL *weight, REAL *d_weight,
                                        REAL *d_bias) {
    const int64_t n = blocks * H;
#pragma omp simd
    for (int64_t u = 0; u < n; u++) {
        d_weight[u] += g[u] * normed[u];
        d_bias[u] += g[u];
        g[u] *= weight[u];
    }
    for (int64_t p = 0; p < blocks; p++) {
        REAL *gp = g + p * H;
        const REAL *np = normed + p * H;
        REAL mean_g = 0, mean_gx = 0;
#pragma omp simd reduction(+ : mean_g, mean_gx)
        for (int64_t u = 0; u < H; u++) {
            mean_g += gp[u];
            mean_gx += gp[u] * np[u];
        }
        mean_g /= (REAL)H;
        mean_gx /= (REAL)H;
#pragma omp simd
        for (int64_t u = 0; u < H; u++)
            gp[u] = istd[p] * (gp[u] - mean_g - np[u] * mean_gx);
    }
}

/* Zoneout of one carried state over rows x H: next = keep * prev + (1 - keep) * next, keep's rows
 * ld_keep apart (zero for rates shared by every row). */
static void SFX(zoneout_mix)(int64_t rows, int64_t H, const REAL *keep, int64_t ld_keep,
                             const REAL *prev, REAL *next) {
    for (int64_t b = 0; b < rows; b++) {
        const REAL *zr = keep + b * ld_keep, *pr = prev + b * H;
        REAL *nr = next + b * H;
#pragma omp simd
        for (int64_t u = 0; u < H; u++)
            nr[u] = zr[u] * pr[u] + (1 - zr[u]) * nr[u];
    }
}

/* From d(i*g) and d(f*c_prev) of one level at one step: its gate gradients (o's gradient by its
 * activated value is already in place) and the gradient of its previous cell, added to what
 * dc_prev holds when accumulate is set (zoneout's share), else written. */
static void SFX(gate_backward)(int64_t rows, int64_t H, const int32_t *act, const REAL *z,
                               const REAL *cp, const REAL *d_ig, int64_t ld_ig, const REAL *d_fc,
                               int64_t ld_fc, REAL *dz, REAL *dc_prev, int accumulate) {
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
            dcr[u] = fc[u] * f + (accumulate ? dcr[u] : 0);
        }
        SFX(times_derivative)(act[0], zr, dr, 2 * H);                 /* i, f */
        SFX(times_derivative)(act[1], zr + 2 * H, dr + 2 * H, H);     /* g */
        SFX(times_derivative)(act[0], zr + 3 * H, dr + 3 * H, H);     /* o */
    }
}
