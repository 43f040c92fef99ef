/* The CPU kernel of the nested-LSTM op: the time loops (per-step recurrent GEMMs and all pointwise
 * math) of the whole-sequence op (cpu_kernel_sequence.h) and the outer steps around a memory
 * function written in Python (cpu_kernel_steps.h), both made of cpu_kernel_parts.h. Its interface
 * (layout, argument struct, activation codes, every exported function) is nlstm_kernel.h.
 *
 * Built and loaded by native.py; driven by c_loop.py and ops/outer_lstm, which allocate every
 * buffer, run the input projection and the parameter gradients (large GEMMs outside the loop).
 * The GEMMs call the BLAS that PyTorch itself links (MKL on x86-64), through function pointers
 * set by nlstm_set_blas.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nlstm_kernel.h"

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

int nlstm_abi_version(void) { return NLSTM_ABI_VERSION; }

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
        {"zoneout", offsetof(nlstm_args, zoneout)},
        {"zoneout_level_stride", offsetof(nlstm_args, zoneout_level_stride)},
        {"zoneout_step_stride", offsetof(nlstm_args, zoneout_step_stride)},
        {"zoneout_row_stride", offsetof(nlstm_args, zoneout_row_stride)},
        {"norms", offsetof(nlstm_args, norms)},
        {"norm_gates", offsetof(nlstm_args, norm_gates)},
        {"norm_cells", offsetof(nlstm_args, norm_cells)},
        {"inv_std", offsetof(nlstm_args, inv_std)},
        {"d_norms", offsetof(nlstm_args, d_norms)},
    };
    size_t used = 0;
    for (size_t n = 0; n < sizeof fields / sizeof fields[0]; n++)
        used += (size_t)snprintf(text + used, sizeof text - used, "%s:%zu,", fields[n].name,
                                 fields[n].offset);
    snprintf(text + used, sizeof text - used, "size:%zu", sizeof(nlstm_args));
    return text;
}

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
#define SQRT sqrtf
#define GEMM sgemm_ptr
#define HAS_PACKED 1
#include "cpu_kernel_parts.h"
#include "cpu_kernel_sequence.h"
#include "cpu_kernel_steps.h"
#undef REAL
#undef SFX
#undef SIGMOID
#undef TANH
#undef ABS
#undef SQRT
#undef GEMM
#undef HAS_PACKED

#define REAL double
#define SFX(name) name##_f64
#define SIGMOID sigmoid_f64
#define TANH tanh_f64
#define ABS fabs
#define SQRT sqrt
#define GEMM dgemm_ptr
#define HAS_PACKED 0
#include "cpu_kernel_parts.h"
#include "cpu_kernel_sequence.h"
#include "cpu_kernel_steps.h"
