/* DGC's step on one float32 CPU tensor, fused: gradcomp.kernels builds this file
 * with the system C compiler and calls it through ctypes (no Python C API, no
 * torch headers).  The torch ops of gradcomp.memory / gradcomp.compressors.sparse
 * are the reference it is tested against, and the fallback without a compiler.
 *
 *   gc_compensate  u = m*u + g; v += u (Nesterov: u = m*(u + g); v += u + g),
 *                  and a strided sample of |v|, in one pass over memory;
 *   gc_select      exactly the k largest |v| (lowest index first among ties),
 *                  in increasing index order: threshold from the sample, one
 *                  counting-and-compacting pass, refined as select_dgc does;
 *   gc_finish      the payload (float16 values times a power-of-two scale and
 *                  Elias-Fano coded indices, or float32 values and int32/int64
 *                  indices), then v[idx] -= sent value and, with masking, u[idx] = 0.
 *
 * Large tensors are split into blocks over OpenMP threads (the runtime torch
 * loaded: the same libgomp.so.1), in a static order, so results do not depend
 * on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16384          /* elements per block: |v| of a block is sampled while in cache */
#define PARALLEL_MIN 262144  /* below this many elements, one thread */
#define MAX_THREADS 64

/* ---------------------------------------------------------- compensate */

int gc_compensate(const float *g, float *u, float *v, int64_t n, float m, int nesterov, int64_t stride,
                  float *sample, int threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        if (nesterov) {
            for (int64_t i = lo; i < hi; i++) {
                float ui = (u[i] + g[i]) * m;
                u[i] = ui;
                v[i] = v[i] + (ui + g[i]);
            }
        } else {
            for (int64_t i = lo; i < hi; i++) {
                float ui = g[i] + m * u[i];
                u[i] = ui;
                v[i] = v[i] + ui;
            }
        }
        if (sample) {
            for (int64_t i = (lo + stride - 1) / stride * stride; i < hi; i += stride) sample[i / stride] = fabsf(v[i]);
        }
    }
    return 0;
}

/* ------------------------------------------------------------ selection */

static void swap_f(float *a, float *b) {
    float t = *a;
    *a = *b;
    *b = t;
}

/* Reorder a[0..n) so that a[r] is the (r+1)-th largest and a[0..r) are >= it (quickselect with a
 * three-way partition: many equal values, zeros say, cost no more than distinct ones). */
static void select_desc(float *a, int64_t n, int64_t r) {
    int64_t lo = 0, hi = n;
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    while (hi - lo > 1) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        float pivot = a[lo + (int64_t)(seed % (uint64_t)(hi - lo))];
        int64_t gt = lo, i = lo, lt = hi; /* [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot */
        while (i < lt) {
            if (a[i] > pivot) swap_f(&a[i++], &a[gt++]);
            else if (a[i] < pivot) swap_f(&a[i], &a[--lt]);
            else i++;
        }
        if (r < gt) hi = gt;
        else if (r >= lt) lo = lt;
        else return;
    }
}

#if defined(__AVX__)
#include <immintrin.h>

/* Bit j set when |p[j]| >= t (or > t), for 8 entries. */
static inline __m256 magnitude8(const float *p) {
    return _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

static inline unsigned mask8(const float *p, __m256 limit) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(magnitude8(p), limit, _CMP_GE_OQ));
}

static inline unsigned above8(const float *p, float t) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(magnitude8(p), _mm256_set1_ps(t), _CMP_GT_OQ));
}
#endif

/* Indices of |v[i]| >= t in [lo, hi), at most cap of them written; returns the count.  Few pass: with AVX
 * 32 entries are compared at once and most such lanes are skipped whole. */
static int64_t passing(const float *v, int64_t lo, int64_t hi, float t, int64_t *out, int64_t cap) {
    int64_t count = 0, i = lo;
#if defined(__AVX__)
    __m256 limit = _mm256_set1_ps(t);
    for (; i + 32 <= hi; i += 32) {
        uint64_t bits = (uint64_t)mask8(v + i, limit) | (uint64_t)mask8(v + i + 8, limit) << 8 |
                        (uint64_t)mask8(v + i + 16, limit) << 16 | (uint64_t)mask8(v + i + 24, limit) << 24;
        for (; bits; bits &= bits - 1) {
            if (count < cap) out[count] = i + __builtin_ctzll(bits);
            count++;
        }
    }
#endif
    for (; i < hi; i++) {
        if (fabsf(v[i]) >= t) {
            if (count < cap) out[count] = i;
            count++;
        }
    }
    return count;
}

/* All indices with |v| >= t, in order, into out (capacity cap per thread, scratch for threads * cap);
 * returns the count, or -1 when a thread found more than cap (nothing usable written). */
static int64_t passing_all(const float *v, int64_t n, float t, int64_t *out, int64_t cap, int threads) {
    int parts = n >= PARALLEL_MIN ? threads : 1;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    int64_t counts[MAX_THREADS];
    int64_t chunk = (n + parts - 1) / parts;
#pragma omp parallel for num_threads(parts) if (parts > 1) schedule(static)
    for (int p = 0; p < parts; p++) {
        int64_t lo = p * chunk, hi = lo + chunk < n ? lo + chunk : n;
        counts[p] = lo < hi ? passing(v, lo, hi, t, out + p * cap, cap) : 0;
    }
    int64_t total = 0;
    for (int p = 0; p < parts; p++) {
        if (counts[p] > cap) return -1;
        if (p && counts[p]) memmove(out + total, out + p * cap, (size_t)counts[p] * sizeof(int64_t));
        total += counts[p];
    }
    return total;
}

/* Keep the k largest |v| among the c ascending candidates (lowest index first among ties), in place. */
static void keep_largest(const float *v, int64_t *cand, int64_t c, int64_t k, float *scratch) {
    if (c == k) return;
    for (int64_t j = 0; j < c; j++) scratch[j] = fabsf(v[cand[j]]);
    select_desc(scratch, c, k - 1);
    float t = scratch[k - 1];
    int64_t above = 0;
    for (int64_t j = 0; j < c; j++) above += fabsf(v[cand[j]]) > t;
    int64_t ties = k - above, kept = 0;
    for (int64_t j = 0; j < c; j++) {
        float a = fabsf(v[cand[j]]);
        if (a > t || (a == t && ties-- > 0)) cand[kept++] = cand[j];
    }
}

/* Min-heap of (magnitude, index) pairs; the root is the smallest magnitude kept. */
static void sift_down(float *a, int64_t *at, int64_t k, int64_t j) {
    for (;;) {
        int64_t c = 2 * j + 1;
        if (c >= k) return;
        if (c + 1 < k && (a[c + 1] < a[c] || (a[c + 1] == a[c] && at[c + 1] > at[c]))) c++;
        if (a[j] < a[c] || (a[j] == a[c] && at[j] > at[c])) return;
        float t = a[j];
        a[j] = a[c], a[c] = t;
        int64_t i = at[j];
        at[j] = at[c], at[c] = i;
        j = c;
    }
}

static int ascending(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* The r largest |a[i]| of a[0..m) (lower index first among ties) as a min-heap in heap / at: one scan,
 * most entries rejected by a comparison with the root (8 at a time with AVX); an entry equal to the
 * root comes later, has the higher index and loses the tie. */
static void heap_top(const float *a, int64_t m, int64_t r, float *heap, int64_t *at) {
    for (int64_t i = 0; i < r; i++) heap[i] = fabsf(a[i]), at[i] = i;
    for (int64_t j = r / 2 - 1; j >= 0; j--) sift_down(heap, at, r, j);
    int64_t i = r;
#if defined(__AVX__)
    for (; i + 8 <= m; i += 8) {
        for (unsigned bits = above8(a + i, heap[0]); bits; bits &= bits - 1) {
            int64_t j = i + __builtin_ctz(bits);
            float x = fabsf(a[j]);
            if (x > heap[0]) heap[0] = x, at[0] = j, sift_down(heap, at, r, 0);
        }
    }
#endif
    for (; i < m; i++) {
        float x = fabsf(a[i]);
        if (x > heap[0]) heap[0] = x, at[0] = i, sift_down(heap, at, r, 0);
    }
}

/* The k largest |v| of the whole tensor, exactly (small tensors), ascending: a heap when they are few
 * (k <= n / 64), quickselect on a copy when many.  out and scratch hold n entries. */
static int64_t exact(const float *v, int64_t n, int64_t k, int64_t *out, float *scratch) {
    if (k > n / 64) {
        for (int64_t i = 0; i < n; i++) out[i] = i;
        keep_largest(v, out, n, k, scratch);
        return k;
    }
    heap_top(v, n, k, scratch, out);
    qsort(out, (size_t)k, sizeof(int64_t), ascending);
    return k;
}

/* Move at least the r largest of the m non-negative a[] to the front; returns how many moved (c >= r).
 * A histogram of the top bits (exponent and 3 bits of mantissa: non-negative floats order as their bit
 * patterns) finds the bin of the r-th largest; that bin and those above it move. */
static int64_t front(float *a, int64_t m, int64_t r) {
    enum { SHIFT = 20, BINS = 1 << (31 - SHIFT) };
    uint32_t hist[BINS] = {0};
    for (int64_t i = 0; i < m; i++) {
        uint32_t bits;
        memcpy(&bits, &a[i], 4);
        hist[bits >> SHIFT]++;
    }
    int64_t seen = 0;
    uint32_t bin = BINS - 1;
    for (; bin > 0 && (seen += hist[bin]) < r; bin--) {}
    int64_t c = 0;
    for (int64_t i = 0; i < m; i++) {
        uint32_t bits;
        memcpy(&bits, &a[i], 4);
        if (bits >> SHIFT >= bin) swap_f(&a[i], &a[c++]);
    }
    return c;
}

/* Exactly the k largest |v| into out (ascending, the lower index first among ties); returns k.
 *   sample: the ms sampled |v| (reordered here); ranked: scratch for 8 * rank floats;
 *   out: scratch for threads * cap indices (cap >= upper * k); scratch: max(cap, n when exact) floats. */
int64_t gc_select(const float *v, int64_t n, int64_t k, int exact_only, float *sample, int64_t ms, double upper,
                  int max_iters, int64_t *out, int64_t cap, float *scratch, int threads) {
    if (k >= n) {
        for (int64_t i = 0; i < n; i++) out[i] = i;
        return n;
    }
    if (exact_only) return exact(v, n, k, out, scratch);
    double target = (1.0 + upper) / 2.0;
    int64_t rank = (int64_t)ceil(target * (double)k * (double)ms / (double)n);
    rank = rank < 1 ? 1 : rank > ms ? ms : rank;
    int64_t ranked = 8 * rank < ms ? 8 * rank : ms;
    int64_t top = front(sample, ms, ranked); /* the sample's order statistics up to ranked come from here */
    int64_t count = -1;
    for (int it = 0; it < max_iters; it++) {
        select_desc(sample, top, rank - 1);
        float t = sample[rank - 1];
        count = passing_all(v, n, t, out, cap, threads);
        if (count >= k && count <= upper * k) break;
        if (count < 0 && t == 0) break; /* zeros tie past the buffer: the caller falls back */
        double found = count < 0 ? (double)cap * threads : count > 1 ? (double)count : 1.0;
        int64_t next = (int64_t)nearbyint((double)rank * target * (double)k / found);
        next = next < 1 ? 1 : next > ranked ? ranked : next;
        if (next == rank) next = count >= 0 && count < k ? rank + 1 : rank - 1;
        if (next < 1 || next > ranked) break;
        rank = next;
    }
    if (count < k) { /* the threshold never settled (zeros past the buffer, say): rank the whole tensor */
        heap_top(v, n, k, scratch, out);
        qsort(out, (size_t)k, sizeof(int64_t), ascending);
        return k;
    }
    keep_largest(v, out, count, k, scratch);
    return k;
}

/* -------------------------------------------------------------- payload */

static uint16_t to_half(float f) { /* round to nearest even, as torch's float -> float16 */
    _Float16 h = (_Float16)f;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}

static float from_half(uint16_t bits) {
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}

static void set_bits(uint8_t *out, int64_t at, uint64_t value, int width) { /* most significant first */
    for (int b = width - 1; b >= 0; b--, at++)
        if ((value >> b) & 1) out[at >> 3] |= (uint8_t)(128 >> (at & 7));
}

static int64_t nbytes(int64_t bits) { return (bits + 7) / 8; }

/* Elias-Fano code of ascending idx (the format of gradcomp.compressors.bits.encode_sorted). */
static void encode_sorted(const int64_t *idx, int64_t k, int64_t n, uint8_t *code, int64_t code_bytes) {
    memset(code, 0, (size_t)code_bytes);
    int low = 0;
    for (int64_t q = n / k; q > 1; q >>= 1) low++;
    int64_t split = nbytes(k * low);
    if (low)
        for (int64_t j = 0; j < k; j++) set_bits(code, j * low, (uint64_t)idx[j] & ((1ull << low) - 1), low);
    uint8_t *high = code + split;
    for (int64_t j = 0; j < k; j++) {
        int64_t at = (idx[j] >> low) + j;
        high[at >> 3] |= (uint8_t)(128 >> (at & 7));
    }
}

/* Payload of the k ascending idx of v, then v[idx] -= the value sent and (u != NULL) u[idx] = 0.
 *   compact (code != NULL): half[k], scale[1], code[code_bytes], sent[k] = half * scale;
 *   plain: sent[k] = v[idx], and idx32 (when not NULL) the indices as int32. */
int gc_finish(float *v, float *u, int64_t n, const int64_t *idx, int64_t k, uint16_t *half, float *scale,
              uint8_t *code, int64_t code_bytes, float *sent, int32_t *idx32) {
    if (code) {
        float peak = 0.0f;
        for (int64_t j = 0; j < k; j++) peak = fmaxf(peak, fabsf(v[idx[j]]));
        float s = 1.0f;
        if (peak > 0) {
            int e;
            frexpf(peak, &e); /* peak = f * 2**e, f in [0.5, 1) */
            s = ldexpf(1.0f, e - 15 < -126 ? -126 : e - 15);
        }
        *scale = s;
        float inv = 1.0f / s;
        for (int64_t j = 0; j < k; j++) {
            half[j] = to_half(v[idx[j]] * inv);
            sent[j] = from_half(half[j]) * s;
        }
        encode_sorted(idx, k, n, code, code_bytes);
    } else {
        for (int64_t j = 0; j < k; j++) sent[j] = v[idx[j]];
        if (idx32)
            for (int64_t j = 0; j < k; j++) idx32[j] = (int32_t)idx[j];
    }
    for (int64_t j = 0; j < k; j++) v[idx[j]] = v[idx[j]] - sent[j];
    if (u)
        for (int64_t j = 0; j < k; j++) u[idx[j]] = 0.0f;
    return 0;
}
