/* One step of the outer LSTM around a memory function written in Python (ops/outer_lstm): the
 * recurrent GEMM and the pointwise math before the memory function, and their backward. ``rows``
 * (B, 4H) tiles are row-major; z holds the step's input projection on entry to outer_gates, its
 * activated gates afterwards. The weight is a matrix made once per sequence by nlstm_matrix_new
 * (packed where MKL's packed GEMM is there). Activation codes as in nlstm_kernel.h. Written once
 * for REAL = float and double, after cpu_kernel_parts.h.
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
 */

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
    SFX(gate_backward)(rows, H, act, z, c_prev, d_gi, H, d_gc, H, dz, dc_prev, 0);
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
    SFX(gate_backward)(rows, H, act, z_next, c, d_gi, H, d_gc, H, dz_next, d_cell, 0);
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
