/* Time loops of the nested-LSTM op on CPU: the per-step recurrent GEMMs and all pointwise math.
 *
 * Built and loaded by native.py; driven by c_loop.py, which allocates every buffer, runs the
 * input projection and the parameter gradients (large GEMMs outside the loop). The GEMMs call the
 * BLAS that PyTorch itself links (MKL on x86-64), through function pointers set by nlstm_set_blas.
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
 * activation (the index in nestrnn.activations.ACTIVATIONS).
 * Time t reads slot t + lo and writes slot t + lo + step, (lo, step) = (0, 1) or (1, -1) reversed.
 * Packed batches: rows >= batch_sizes[t] are inactive at step t and carry their state.
 *
 * The Python side checks its mirror of nlstm_args against nlstm_args_layout() and the version
 * against nlstm_abi_version() before the first call; every entry point returns 0 or an NLSTM_E*.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NLSTM_ABI_VERSION 7
#define NLSTM_EINVAL 1 /* an argument is out of range */

/* Fortran BLAS (column-major, arguments by reference, 32-bit integers) */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);
typedef void (*dgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const double *, const double *, const int *, const double *, const int *,
                         const double *, double *, const int *);
/* MKL's packed GEMM: pack the weight once per call, reuse it every step */
typedef size_t (*pack_size_fn)(const char *, const int *, const int *, const int *);
typedef void (*spack_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, float *);
typedef void (*scompute_fn)(const char *, const char *, const int *, const int *, const int *,
                            const float *, const int *, const float *, const int *, const float *,
                            float *, const int *);

static sgemm_fn sgemm_ptr;
static dgemm_fn dgemm_ptr;
static pack_size_fn pack_size_ptr;
static spack_fn spack_ptr;
static scompute_fn scompute_ptr;

/* Set the BLAS entry points; the packed ones may be NULL. */
int nlstm_set_blas(void *sgemm, void *dgemm, void *pack_size, void *spack, void *scompute) {
    if (!sgemm || !dgemm)
        return NLSTM_EINVAL;
    sgemm_ptr = (sgemm_fn)sgemm;
    dgemm_ptr = (dgemm_fn)dgemm;
    pack_size_ptr = (pack_size_fn)pack_size;
    spack_ptr = (spack_fn)spack;
    scompute_ptr = (scompute_fn)scompute;
    return 0;
}

/* Buffers of packed weights, kept for the next call: fresh memory of that size (a few hundred
 * KB) is mapped anew by malloc and page-faults on its first touch, every call, which costs more
 * than the packing itself where faults are slow. At most POOL_SLOTS buffers and POOL_BYTES in all
 * are kept; each is reused for a request of at least half its size. */
#define POOL_SLOTS 16
#define POOL_BYTES ((size_t)64 << 20)
static struct {
    void *ptr;
    size_t size;
} pool[POOL_SLOTS];
static size_t pool_bytes; /* held in the pool */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

/* A buffer of at least *size bytes (*size becomes its real size), or NULL. */
static void *pool_take(size_t *size) {
    void *found = NULL;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < POOL_SLOTS && !found; i++)
        if (pool[i].ptr && pool[i].size >= *size && pool[i].size / 2 <= *size) {
            found = pool[i].ptr;
            *size = pool[i].size;
            pool[i].ptr = NULL;
            pool_bytes -= *size;
        }
    pthread_mutex_unlock(&pool_lock);
    return found ? found : malloc(*size);
}

static void pool_give(void *ptr, size_t size) {
    if (!ptr)
        return;
    pthread_mutex_lock(&pool_lock);
    for (int i = 0; i < POOL_SLOTS && ptr && pool_bytes + size <= POOL_BYTES; i++)
        if (!pool[i].ptr) {
            pool[i].ptr = ptr;
            pool[i].size = size;
            pool_bytes += size;
            ptr = NULL;
        }
    pthread_mutex_unlock(&pool_lock);
    free(ptr); /* the pool is full */
}

/* Everything one call needs; integers are int64. */
typedef struct {
    int64_t steps, batch, hidden, depth;
    int64_t reverse, save;
    const int64_t *batch_sizes; /* (T,) or NULL: every row active */
    const int32_t *activations; /* (3D,) */
    void **gates, **inputs, **cells, **act_cells, **h;
    const void *w_hh0;
    const void **w_nested, **bias;
    /* backward only */
    const void *d_out; /* (T, B, H) */
    void *dh;          /* (B, H): d h_n on entry, d h0 on return */
    void *dc;          /* (D, B, H): d c_n on entry, d c0 on return */
    void **d_gates;    /* [k] (T, B, 4H) pre-activation gate gradients; zero where inactive */
    void *scratch;     /* (B, 2H) */
    void *dht;         /* (B, H) */
} nlstm_args;

int nlstm_abi_version(void) { return NLSTM_ABI_VERSION; }

/* "name:offset,..." of every field and "size:<sizeof>", so that the caller can check its mirror */
const char *nlstm_args_layout(void) {
    static char text[1024];
    static const struct {
        const char *name;
        size_t offset;
    } fields[] = {
        {"steps", offsetof(nlstm_args, steps)},
        {"batch", offsetof(nlstm_args, batch)},
        {"hidden", offsetof(nlstm_args, hidden)},
        {"depth", offsetof(nlstm_args, depth)},
        {"reverse", offsetof(nlstm_args, reverse)},
        {"save", offsetof(nlstm_args, save)},
        {"batch_sizes", offsetof(nlstm_args, batch_sizes)},
        {"activations", offsetof(nlstm_args, activations)},
        {"gates", offsetof(nlstm_args, gates)},
        {"inputs", offsetof(nlstm_args, inputs)},
        {"cells", offsetof(nlstm_args, cells)},
        {"act_cells", offsetof(nlstm_args, act_cells)},
        {"h", offsetof(nlstm_args, h)},
        {"w_hh0", offsetof(nlstm_args, w_hh0)},
        {"w_nested", offsetof(nlstm_args, w_nested)},
        {"bias", offsetof(nlstm_args, bias)},
        {"d_out", offsetof(nlstm_args, d_out)},
        {"dh", offsetof(nlstm_args, dh)},
        {"dc", offsetof(nlstm_args, dc)},
        {"d_gates", offsetof(nlstm_args, d_gates)},
        {"scratch", offsetof(nlstm_args, scratch)},
        {"dht", offsetof(nlstm_args, dht)},
    };
    size_t used = 0;
    for (size_t n = 0; n < sizeof fields / sizeof fields[0]; n++)
        used += (size_t)snprintf(text + used, sizeof text - used, "%s:%zu,", fields[n].name,
                                 fields[n].offset);
    snprintf(text + used, sizeof text - used, "size:%zu", sizeof(nlstm_args));
    return text;
}

enum { ACT_SIGMOID, ACT_TANH, ACT_IDENTITY, ACT_RELU, ACT_HARDTANH, ACT_SOFTSIGN, ACT_COUNT };

/* float: exp from a degree-6 polynomial (Cephes' expf, ~1 ulp on the reduced range) so that
 * the loops vectorise; libm's expf is a scalar call without -ffast-math. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
static inline float tanh_f32(float x) { return 2.0f / (1.0f + exp_f32(-2.0f * x)) - 1.0f; }
static inline double sigmoid_f64(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline double tanh_f64(double x) { return tanh(x); }

#define REAL float
#define SFX(name) name##_f32
#define SIGMOID sigmoid_f32
#define TANH tanh_f32
#define ABS fabsf
#define GEMM sgemm_ptr
#define HAS_PACKED 1
#include "cpu_kernel_loops.h"
#undef REAL
#undef SFX
#undef SIGMOID
#undef TANH
#undef ABS
#undef GEMM
#undef HAS_PACKED

#define REAL double
#define SFX(name) name##_f64
#define SIGMOID sigmoid_f64
#define TANH tanh_f64
#define ABS fabs
#define GEMM dgemm_ptr
#define HAS_PACKED 0
#include "cpu_kernel_loops.h"
