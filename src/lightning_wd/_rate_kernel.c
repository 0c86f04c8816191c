/* The statistics pass of EffectiveLRMonitor over one CPU tensor, fused into one read of the state.
 *
 * lightning_wd.effective_lr computes, for a second-moment state u, the rate r = scale / (sqrt(u) + eps) of every
 * element, then its min, max, sum and a histogram of its fp32 bits. With eager torch ops that is eight passes over
 * a chunk (root, add, divide, min/max, sum, shift, clamp, bincount with its own min and max); here it is one read of
 * u, the arithmetic on a block that stays in L1, and increments of a 16-bit histogram that stays in L1 too.
 *
 * The arithmetic is torch's, operation for operation, in fp32: sqrt, then + eps (skipped for eps == 0, as the
 * eager pass does), then scale / x, each correctly rounded (the compiler may vectorize them, never reassociate
 * them; torch's CPU sqrt may differ by one ulp). The bins are those of effective_lr.accumulate_partials: the bits
 * shifted right by `shift`, minus `first`, clamped to [0, nbins); a negative rate goes to the first bin, like the
 * eager clamp of a negative index, and a NaN to the last, where the eager pass puts the NaN torch makes. min and
 * max become NaN if any rate is NaN (as torch.aminmax); the sum is added per block in fp32 over 16 lanes, then in
 * fp64.
 *
 * Plain C99 and Python's C API only: no torch headers, so it builds in a fraction of a second with any C compiler
 * and loads into any torch version. Built as an optional extension (setup.py); without it the eager pass runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256
/* below this many elements the counts go straight into the fp64 row: clearing and flushing a 16-bit table costs
   more than it saves */
#define SMALL 4096

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

typedef struct {
    const void *u;
    int64_t n;
    int dtype, root;
    float scale, eps;
    float *ext;    /* [min, max] */
    double *sums;  /* [sum, count, hist...] */
    int32_t first, nbins, shift;
} Job;

/* Add the counts of bins lo .. hi into the fp64 histogram, and clear them. */
static void flush(uint16_t *table, int32_t lo, int32_t hi, double *hist) {
    for (int32_t k = lo; k <= hi; k++) {
        hist[k] += table[k];
        table[k] = 0;
    }
}

/* Where the CPU has AVX2 (x86-64-v3), GCC compiles a second copy of the pass for it and picks one at load time
 * (an ifunc: glibc): 1.65x the speed of the SSE2 baseline on the development machine (an AMD EPYC), where an
 * AVX-512 copy measured slower than the AVX2 one. The results are the same: each operation is correctly rounded at
 * any width, and -ffp-contract=off (setup.py) keeps the compiler from fusing operations into an FMA. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__GLIBC__)
#define WIDEST_VECTORS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define WIDEST_VECTORS
#endif

/* The rates scale / (sqrt(u) + eps) of elements i .. i + m of the state, into r. */
static inline void rates(const Job *job, int64_t i, int m, float *r) {
    const float scale = job->scale, eps = job->eps;
    if (job->dtype == DTYPE_F32) {
        const float *src = (const float *)job->u + i;
        if (job->root) {
            for (int j = 0; j < m; j++) r[j] = sqrtf(src[j]);
        } else {
            for (int j = 0; j < m; j++) r[j] = src[j];
        }
    } else { /* bf16: the upper half of an fp32, exactly */
        const uint16_t *src = (const uint16_t *)job->u + i;
        for (int j = 0; j < m; j++) {
            const uint32_t bits = (uint32_t)src[j] << 16;
            memcpy(r + j, &bits, sizeof bits);
        }
        if (job->root) {
            for (int j = 0; j < m; j++) r[j] = sqrtf(r[j]);
        }
    }
    if (eps != 0.0f) {
        for (int j = 0; j < m; j++) r[j] += eps;
    }
    for (int j = 0; j < m; j++) r[j] = scale / r[j];
}

/* The bin of a rate from its fp32 bits, as the eager pass computes it: an arithmetic shift (a set sign bit, a
   negative rate or -0, gives a negative index), minus the first bin, clamped to the bins. */
static inline int32_t bin_of(int32_t bits, uint32_t shift, int32_t first, int32_t last) {
    int32_t k = (bits >> shift) - first;
    k = k < 0 ? 0 : k;
    return k > last ? last : k;
}

/* The rates of elements i .. i + m into r, their bins into key, and their sum, min, max and NaN flag.
 *
 * min and max are taken over the bits as int32: for non-negative floats (rates are) the bits grow with the value,
 * and an integer min/max vectorizes where a float one does not without -ffast-math (which would reorder it). Only a
 * block holding a negative rate, -0 or a NaN is read again as floats. The sum runs over 16 lanes, which the
 * compiler keeps in vector registers. */
static inline void block(const Job *job, int64_t i, int m, float *r, int32_t *key, float *block_sum, float *mn,
                         float *mx, int *nan, int32_t *key_lo, int32_t *key_hi) {
    const uint32_t shift = (uint32_t)job->shift;
    const int32_t first = job->first, last = job->nbins - 1;
    rates(job, i, m, r);
    int32_t bits[BLOCK];
    memcpy(bits, r, (size_t)m * sizeof(float));
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int j = 0; j < m; j++) {
        const int32_t b = bits[j];
        lo = b < lo ? b : lo;
        hi = b > hi ? b : hi;
        key[j] = bin_of(b, shift, first, last);
    }
    float lanes[16] = {0};
    int j = 0;
    for (; j + 16 <= m; j += 16) {
        for (int l = 0; l < 16; l++) lanes[l] += r[j + l];
    }
    float s = 0.0f;
    for (; j < m; j++) s += r[j];
    for (int l = 0; l < 16; l++) s += lanes[l];
    *block_sum = s;
    if (lo >= 0 && hi <= 0x7f800000) { /* no sign bit set and no NaN: the bits' order is the values' */
        float a, b;
        memcpy(&a, &lo, sizeof a);
        memcpy(&b, &hi, sizeof b);
        *mn = a < *mn ? a : *mn;
        *mx = b > *mx ? b : *mx;
        *key_lo = bin_of(lo, shift, first, last);
        *key_hi = bin_of(hi, shift, first, last);
        return;
    }
    for (int q = 0; q < m; q++) { /* the rare block: as floats, and a NaN of either sign to the last bin */
        const float x = r[q];
        *mn = x < *mn ? x : *mn;
        *mx = x > *mx ? x : *mx;
        if (x != x) {
            *nan = 1;
            key[q] = last;
        }
    }
    *key_lo = 0;
    *key_hi = last;
}

WIDEST_VECTORS
static int run(const Job *job) {
    float r[BLOCK];
    int32_t key[BLOCK];
    double *hist = job->sums + 2;
    uint16_t *table = NULL;
    int32_t touched_lo = job->nbins, touched_hi = -1;
    int64_t pending = 0;
    if (job->n >= SMALL) {
        table = (uint16_t *)calloc((size_t)job->nbins, sizeof(uint16_t));
        if (table == NULL) return -1;
    }
    float mn = INFINITY, mx = -INFINITY;
    int nan = 0;
    double sum = 0.0;
    for (int64_t i = 0; i < job->n; i += BLOCK) {
        const int m = (int)(job->n - i < BLOCK ? job->n - i : BLOCK);
        float block_sum;
        int32_t key_lo, key_hi;
        block(job, i, m, r, key, &block_sum, &mn, &mx, &nan, &key_lo, &key_hi);
        sum += block_sum;

        if (table == NULL) {
            for (int q = 0; q < m; q++) hist[key[q]] += 1.0;
        } else {
            for (int q = 0; q < m; q++) table[key[q]]++;
            touched_lo = key_lo < touched_lo ? key_lo : touched_lo;
            touched_hi = key_hi > touched_hi ? key_hi : touched_hi;
            pending += m;
            if (pending > 65535 - BLOCK) { /* before a 16-bit count could overflow */
                flush(table, touched_lo, touched_hi, hist);
                touched_lo = job->nbins;
                touched_hi = -1;
                pending = 0;
            }
        }
    }
    if (table != NULL) {
        flush(table, touched_lo, touched_hi, hist);
        free(table);
    }
    if (nan) mn = mx = NAN;
    float *ext = job->ext;
    /* torch.minimum / torch.maximum: a NaN on either side wins */
    ext[0] = (ext[0] != ext[0] || mn != mn) ? NAN : (mn < ext[0] ? mn : ext[0]);
    ext[1] = (ext[1] != ext[1] || mx != mx) ? NAN : (mx > ext[1] ? mx : ext[1]);
    job->sums[0] += sum;
    job->sums[1] += (double)job->n;
    return 0;
}

static PyObject *accumulate(PyObject *self, PyObject *args) {
    unsigned long long u, ext, sums;
    long long n;
    int dtype, root, first, nbins, shift;
    double scale, eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLiiddKKiii", &u, &n, &dtype, &root, &scale, &eps, &ext, &sums, &first, &nbins,
                          &shift))
        return NULL;
    if (n < 0 || nbins < 1 || shift < 0 || shift > 31 || (dtype != DTYPE_F32 && dtype != DTYPE_BF16)) {
        PyErr_SetString(PyExc_ValueError, "accumulate: invalid size, bins, shift or dtype");
        return NULL;
    }
    Job job = {(const void *)(uintptr_t)u, (int64_t)n, dtype, root, (float)scale, (float)eps,
               (float *)(uintptr_t)ext, (double *)(uintptr_t)sums, first, nbins, shift};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run(&job);
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"accumulate", accumulate, METH_VARARGS,
     "accumulate(u_ptr, n, dtype, root, scale, eps, ext_ptr, sums_ptr, first, nbins, shift): add the statistics of "
     "scale / (sqrt(u) + eps) (or of u itself without root) into one row of partials, in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rate_kernel",
                                    "The fused statistics pass of lightning_wd.effective_lr (CPU).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rate_kernel(void) { return PyModule_Create(&module); }
