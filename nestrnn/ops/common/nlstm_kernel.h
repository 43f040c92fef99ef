/* The interface of the CPU kernel (cpu_kernel.c): its ABI version, error codes, activation codes,
 * argument struct and every function it exports. cpu_kernel.c and the outer LSTM's step nodes
 * (ops/outer_lstm/step_nodes.cpp) include it; native.py mirrors it in ctypes, and
 * tests/test_native_header.py checks that mirror against this file.
 *
 * Kept in a plain style that the test's parser reads: one declaration per statement, every
 * parameter named, no macros in declarations, comments in C style.
 *
 * Layout (row-major, contiguous; T steps, B rows, H units, D levels; gates in nn.LSTM's order
 * i, f, g, o), the layout.Saved of the Python side split into one pointer per level:
 *   gates[k]     (T or 1, B, 4H)  level k's gates; gates[0] always has T steps and holds
 *                                 x W_ih^T + b on entry. Activated in place by the forward.
 *   inputs[k]    (T or 1, B, 2H)  [x~ | h~] = [i*g | f*c_prev] of level k, level k+1's input
 *   cells[k]     (T+1 or 2, B, H) the level's cell by slot: slot j is the state before step j
 *   act_cells[k] (T or 1, B, H)   the cell activation of each new cell
 *   h[j]         T+1 slot pointers, each (B, H)
 * "T or 1": all steps when the forward saves for the backward, else a ring of one step.
 * Weights: w_hh0 (4H, H); w_nested[k] (4H, 2H) = [W_ih | W_hh] of level k >= 1; bias[k] (4H,)
 * = b_ih + b_hh or NULL. activations: per level the codes of its gate, candidate and cell
 * activation (enum nlstm_activation).
 * Time t reads slot t + lo and writes slot t + lo + step, (lo, step) = (0, 1) or (1, -1) reversed.
 * Packed batches: rows >= batch_sizes[t] are inactive at step t and carry their state.
 * Zoneout (NULL: none): keep weights z (D + 1, T, B, H) at the given strides in elements, each row
 * of H contiguous; z[k][t] (k < D) mixes the cell of level k carried past step t with its previous
 * value, c = z c_prev + (1 - z) c_new, and z[D][t] likewise h (the output); the step itself reads
 * the unzoned new cells, and cells[k] holds the carried ones.
 * Layer normalisation (norms NULL: none): norms[4k..4k+3] = level k's gates weight, gates bias
 * (4H,), cell weight, cell bias (H,), all NULL at a level without. Such a level normalises each
 * gate block of z (over its H units, eps 1e-5) before the activations, and the new cell into
 * act_cells before the cell activation (the cell carried is not normalised); it saves
 *   norm_gates[k] (T or 1, B, 4H) the normalised blocks before their scale and shift
 *   norm_cells[k] (T or 1, B, H)  the normalised new cell likewise
 *   inv_std[k]    (T or 1, B, 5)  1/sigma of the blocks i, f, g, o and of the cell
 * and the backward adds the gradients of the four parameters to d_norms[4k..4k+3].
 *
 * The Python side checks its mirror of nlstm_args against nlstm_args_layout() and the version
 * against nlstm_abi_version() before the first call; every entry point returns 0 or an NLSTM_E*.
 */
#ifndef NLSTM_KERNEL_H
#define NLSTM_KERNEL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NLSTM_ABI_VERSION 9
#define NLSTM_EINVAL 1 /* an argument is out of range */

/* The activations by code: the codes of nestrnn.activations.ACTIVATION_TABLE (checked by
 * tests/test_native_header.py). */
enum nlstm_activation {
    NLSTM_ACT_SIGMOID = 0,
    NLSTM_ACT_TANH = 1,
    NLSTM_ACT_IDENTITY = 2,
    NLSTM_ACT_RELU = 3,
    NLSTM_ACT_HARDTANH = 4,
    NLSTM_ACT_SOFTSIGN = 5,
    NLSTM_ACT_COUNT = 6
};

/* Everything one call of the sequence loops needs; integers are int64. */
typedef struct nlstm_args {
    int64_t steps;
    int64_t batch;
    int64_t hidden;
    int64_t depth;
    int64_t reverse;
    int64_t save;
    const int64_t *batch_sizes; /* (T,) or NULL: every row active */
    const int32_t *activations; /* (3D,) */
    void **gates;
    void **inputs;
    void **cells;
    void **act_cells;
    void **h;
    const void *w_hh0;
    const void **w_nested;
    const void **bias;
    /* backward only */
    const void *d_out; /* (T, B, H) */
    void *dh;          /* (B, H): d h_n on entry, d h0 on return */
    void *dc;          /* (D, B, H): d c_n on entry, d c0 on return */
    void **d_gates;    /* [k] (T, B, 4H) pre-activation gate gradients; zero where inactive */
    void *scratch;     /* (B, 2H) */
    void *dht;         /* (B, H) */
    /* zoneout, forward and backward */
    const void *zoneout; /* (D + 1, T, B, H) keep weights, or NULL */
    int64_t zoneout_level_stride;
    int64_t zoneout_step_stride;
    int64_t zoneout_row_stride;
    /* layer normalisation, forward and backward (see above) */
    const void **norms;
    void **norm_gates;
    void **norm_cells;
    void **inv_std;
    void **d_norms;
} nlstm_args;

/* Set the BLAS entry points (Fortran sgemm_, dgemm_, MKL's packed sgemm); the packed ones may be
 * NULL. */
int nlstm_set_blas(void *sgemm, void *dgemm, void *pack_size, void *spack, void *scompute);

int nlstm_abi_version(void);

/* "name:offset,..." of every field of nlstm_args and "size:<sizeof>" */
const char *nlstm_args_layout(void);

/* The sequence loops (cpu_kernel_sequence.h): the forward over all steps; the backward's reverse
 * loop gives the gate gradients of every step and the gradients of h0 and c0, after a forward
 * with save. */
int nlstm_forward_f32(const nlstm_args *a);
int nlstm_backward_f32(const nlstm_args *a);
int nlstm_forward_f64(const nlstm_args *a);
int nlstm_backward_f64(const nlstm_args *a);

/* The outer steps (cpu_kernel_steps.h): one step of the outer LSTM around a memory function
 * written in Python. A GEMM operand kept across calls (W^T when transposed), packed where MKL's
 * packed GEMM is there, for products with full_n rows; NULL when the sizes are out of range. */
void *nlstm_matrix_new_f32(const float *w, int32_t transposed, int64_t m, int64_t k,
                           int64_t full_n);
void nlstm_matrix_free_f32(void *op);
void *nlstm_matrix_new_f64(const double *w, int32_t transposed, int64_t m, int64_t k,
                           int64_t full_n);
void nlstm_matrix_free_f64(void *op);

int nlstm_outer_gates_f32(int64_t rows, int64_t H, int32_t gate, int32_t cand, const void *w,
                          const float *bias, int64_t in_size, const float *x, const float *h,
                          float *xh, float *z, const float *c_prev, float *gc, float *gi,
                          float *o);
int nlstm_outer_gates_f64(int64_t rows, int64_t H, int32_t gate, int32_t cand, const void *w,
                          const double *bias, int64_t in_size, const double *x, const double *h,
                          double *xh, double *z, const double *c_prev, double *gc, double *gi,
                          double *o);

int nlstm_outer_gates_backward_f32(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                   const void *w_hh, const float *z, const float *c_prev,
                                   const float *d_gc, const float *d_gi, const float *d_o,
                                   float *dz, float *dc_prev, float *dh_prev, float *db,
                                   int64_t in_size, float *dx, float *wide);
int nlstm_outer_gates_backward_f64(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                   const void *w_hh, const double *z, const double *c_prev,
                                   const double *d_gc, const double *d_gi, const double *d_o,
                                   double *dz, double *dc_prev, double *dh_prev, double *db,
                                   int64_t in_size, double *dx, double *wide);

int nlstm_outer_transition_f32(int64_t rows, int64_t H, int32_t gate, int32_t cand, int32_t cell,
                               const void *w, const float *bias, int64_t in_size, const float *z,
                               const float *c, float *act_c, float *h, const float *x_next,
                               float *xh_next, float *z_next, float *gc, float *gi);
int nlstm_outer_transition_f64(int64_t rows, int64_t H, int32_t gate, int32_t cand, int32_t cell,
                               const void *w, const double *bias, int64_t in_size,
                               const double *z, const double *c, double *act_c, double *h,
                               const double *x_next, double *xh_next, double *z_next,
                               double *gc, double *gi);

int nlstm_outer_output_f32(int64_t rows, int64_t H, int32_t cell, const float *z, const float *c,
                           float *act_c, float *h);
int nlstm_outer_output_f64(int64_t rows, int64_t H, int32_t cell, const double *z,
                           const double *c, double *act_c, double *h);

int nlstm_outer_transition_backward_f32(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                        int32_t cell, const void *w_hh, const float *z,
                                        const float *act_c, const float *z_next, const float *c,
                                        const float *d_h, const float *d_gc, const float *d_gi,
                                        float *dz, float *dz_next, float *d_cell, float *scratch,
                                        float *db_next, int64_t in_size, float *dx_next,
                                        float *wide);
int nlstm_outer_transition_backward_f64(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                        int32_t cell, const void *w_hh, const double *z,
                                        const double *act_c, const double *z_next,
                                        const double *c, const double *d_h, const double *d_gc,
                                        const double *d_gi, double *dz, double *dz_next,
                                        double *d_cell, double *scratch, double *db_next,
                                        int64_t in_size, double *dx_next, double *wide);

int nlstm_outer_output_backward_f32(int64_t rows, int64_t H, int32_t cell, const float *z,
                                    const float *act_c, float *d_h, float *dz, float *d_cell);
int nlstm_outer_output_backward_f64(int64_t rows, int64_t H, int32_t cell, const double *z,
                                    const double *act_c, double *d_h, double *dz,
                                    double *d_cell);

/* The outer steps as the step nodes call them, for either dtype: the signatures above with the
 * element pointers as void pointers (the test checks that they agree). */
typedef int (*nlstm_outer_transition_fn)(int64_t rows, int64_t H, int32_t gate, int32_t cand,
                                         int32_t cell, const void *w, const void *bias,
                                         int64_t in_size, const void *z, const void *c,
                                         void *act_c, void *h, const void *x_next, void *xh_next,
                                         void *z_next, void *gc, void *gi);
typedef int (*nlstm_outer_transition_backward_fn)(
    int64_t rows, int64_t H, int32_t gate, int32_t cand, int32_t cell, const void *w_hh,
    const void *z, const void *act_c, const void *z_next, const void *c, const void *d_h,
    const void *d_gc, const void *d_gi, void *dz, void *dz_next, void *d_cell, void *scratch,
    void *db_next, int64_t in_size, void *dx_next, void *wide);
typedef int (*nlstm_outer_output_fn)(int64_t rows, int64_t H, int32_t cell, const void *z,
                                     const void *c, void *act_c, void *h);
typedef int (*nlstm_outer_output_backward_fn)(int64_t rows, int64_t H, int32_t cell,
                                              const void *z, const void *act_c, void *d_h,
                                              void *dz, void *d_cell);
typedef void (*nlstm_matrix_free_fn)(void *op);

#ifdef __cplusplus
}
#endif

#endif /* NLSTM_KERNEL_H */
