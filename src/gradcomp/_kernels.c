/* DGC's step on one float32 CPU tensor, fused: gradcomp.kernels builds this file
 * with the system C compiler and calls it through ctypes (no Python C API, no
 * torch headers).  The torch ops of gradcomp.memory / gradcomp.compressors.sparse
 * are the reference it is tested against, and the fallback without a compiler.
 *
 * gc_steps, one call per step for all of a step's tensors, on each tensor:
 *   compensate  u = m*u + g; v += u (Nesterov: u = m*(u + g); v += u + g), and
 *               while each new v is in registers (or its block in cache) a
 *               streaming top-k: entries at or above a threshold (first the
 *               hint: the tensor's last threshold, lowered) join a buffer of
 *               2k + 1; a full buffer is cut to its k largest and the
 *               threshold rises to the k-th, which later entries must beat.
 *               One pass over memory;
 *   select      exactly the k largest |v| (lowest index first among ties), in
 *               increasing index order, ranked among those candidates (v is
 *               read a second time only when the hint was too high);
 *   finish      the payload (float16 values times a power-of-two scale and
 *               Elias-Fano coded indices, or float32 values and int32/int64
 *               indices), then v[idx] -= sent value and, with masking, u[idx] = 0.
 *
 * The tensors of a step are shared out among the OpenMP threads (the runtime
 * torch loaded: the same libgomp.so.1); a tensor too large for one thread's
 * share ("wide") is split into one part per thread instead, each with its own
 * buffer, merged in index order: results do not depend on the number of
 * threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16384          /* elements per block: a block of v is scanned while in cache */
#define PARALLEL_MIN 262144  /* below this many elements, one thread */
#define MAX_THREADS 64

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

/* Candidates for the k largest |v| of a range, in increasing index order: idx[] and their |v| in mag[]
 * (count of them, at most cap > k); tmp[] is scratch of cap floats.  Every entry of the range seen so
 * far that is not among them is smaller than k of them, or below the starting threshold t. */
typedef struct {
    int64_t *idx;
    float *mag, *tmp;
    int64_t count, cap, k;
    float t;
    int strict; /* after a cut: an entry equal to t comes later than k kept ones and loses the tie */
} Top;

/* Keep the k largest of the candidates (the lower index first among ties), in order; returns the k-th. */
static float keep_k(int64_t *idx, float *mag, int64_t c, int64_t k, float *tmp) {
    memcpy(tmp, mag, (size_t)c * sizeof(float));
    select_desc(tmp, c, k - 1);
    float t = tmp[k - 1];
    int64_t above = 0;
    for (int64_t j = 0; j < c; j++) above += mag[j] > t;
    int64_t ties = k - above, kept = 0;
    for (int64_t j = 0; j < c; j++)
        if (mag[j] > t || (mag[j] == t && ties-- > 0)) idx[kept] = idx[j], mag[kept++] = mag[j];
    return t;
}

static inline void offer(Top *s, int64_t i, float a) {
    if (s->strict ? !(a > s->t) : !(a >= s->t)) return;
    if (s->count == s->cap) {
        s->t = keep_k(s->idx, s->mag, s->count, s->k, s->tmp);
        s->count = s->k, s->strict = 1;
        if (!(a > s->t)) return;
    }
    s->idx[s->count] = i, s->mag[s->count++] = a;
}

#if defined(__AVX__)
#include <immintrin.h>

/* Bit j set when |p[j]| >= t, for 8 entries (NaN: never). */
static inline unsigned mask8(const float *p, __m256 limit) {
    __m256 magnitude = _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(magnitude, limit, _CMP_GE_OQ));
}
#endif

/* Offer v[lo..hi) to s.  With AVX 32 entries are compared with the threshold at once and most such
 * lanes are skipped whole. */
static void scan(Top *s, const float *v, int64_t lo, int64_t hi) {
    int64_t i = lo;
#if defined(__AVX__)
    for (; i + 32 <= hi; i += 32) {
        __m256 limit = _mm256_set1_ps(s->t);
        uint64_t bits = (uint64_t)mask8(v + i, limit) | (uint64_t)mask8(v + i + 8, limit) << 8 |
                        (uint64_t)mask8(v + i + 16, limit) << 16 | (uint64_t)mask8(v + i + 24, limit) << 24;
        for (; bits; bits &= bits - 1) {
            int64_t j = i + __builtin_ctzll(bits);
            offer(s, j, fabsf(v[j]));
        }
    }
#endif
    for (; i < hi; i++) offer(s, i, fabsf(v[i]));
}

/* Split [0, n) into parts: one per thread for large tensors, in a fixed order. */
static int num_parts(int64_t n, int threads) {
    int parts = n >= PARALLEL_MIN ? threads : 1;
    return parts < 1 ? 1 : parts > MAX_THREADS ? MAX_THREADS : parts;
}

static Top part_top(int64_t *cand, float *mags, float *tmp, int64_t cap, int64_t k, float t, int p) {
    Top s = {cand + p * cap, mags + p * cap, tmp + p * cap, 0, cap, k, t, 0};
    return s;
}

/* Move the parts' candidates together, in order; returns their count. */
static int64_t merge(Top *tops, int parts, int64_t *cand, float *mags) {
    int64_t total = 0;
    for (int p = 0; p < parts; p++) {
        memmove(cand + total, tops[p].idx, (size_t)tops[p].count * sizeof(int64_t));
        memmove(mags + total, tops[p].mag, (size_t)tops[p].count * sizeof(float));
        total += tops[p].count;
    }
    return total;
}

/* ---------------------------------------------------------- compensate */

/* u = m*u + g; v += u (Nesterov: u = m*(u + g); v += u + g) on [lo, hi), each new v offered to s.  With
 * AVX2 and FMA (the fused multiply-add torch's add(g, u, alpha=m) rounds as) the comparison happens in
 * registers, 8 entries at a time, without reading v again. */
static void compensate(Top *s, const float *g, float *u, float *v, int64_t lo, int64_t hi, float m, int nesterov) {
    int64_t i = lo;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vm = _mm256_set1_ps(m), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 limit = _mm256_set1_ps(s->t); /* in a register: s->t changes only in offer */
#define OFFER_8(vi)                                                                                           \
    unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(vi, abs_mask), limit, _CMP_GE_OQ)); \
    if (__builtin_expect(bits != 0, 0)) {                                                                     \
        for (; bits; bits &= bits - 1) offer(s, i + __builtin_ctz(bits), fabsf(v[i + __builtin_ctz(bits)]));  \
        limit = _mm256_set1_ps(s->t);                                                                         \
    }
    if (nesterov) {
        for (; i + 8 <= hi; i += 8) {
            __m256 gi = _mm256_loadu_ps(g + i), ui = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(u + i), gi), vm);
            __m256 vi = _mm256_add_ps(_mm256_loadu_ps(v + i), _mm256_add_ps(ui, gi));
            _mm256_storeu_ps(u + i, ui), _mm256_storeu_ps(v + i, vi);
            OFFER_8(vi)
        }
    } else {
        for (; i + 8 <= hi; i += 8) {
            __m256 ui = _mm256_fmadd_ps(vm, _mm256_loadu_ps(u + i), _mm256_loadu_ps(g + i));
            __m256 vi = _mm256_add_ps(_mm256_loadu_ps(v + i), ui);
            _mm256_storeu_ps(u + i, ui), _mm256_storeu_ps(v + i, vi);
            OFFER_8(vi)
        }
    }
#undef OFFER_8
#endif
    int64_t start = i;
    if (nesterov) {
        for (; i < hi; i++) {
            float ui = (u[i] + g[i]) * m;
            u[i] = ui;
            v[i] = v[i] + (ui + g[i]);
        }
    } else {
        for (; i < hi; i++) {
            float ui = g[i] + m * u[i];
            u[i] = ui;
            v[i] = v[i] + ui;
        }
    }
    scan(s, v, start, hi);
}

/* compensate() over the whole tensor, block by block on one part per thread, each with its streaming
 * top-k (threshold: hint, at least 0).  Returns how many candidates it left at the front of cand / mags
 * (cand, mags and tmp hold threads * cap entries, cap > k). */
static int64_t compensate_all(const float *g, float *u, float *v, int64_t n, float m, int nesterov, int64_t k,
                              float hint, int64_t *cand, float *mags, float *tmp, int64_t cap, int threads) {
    int parts = num_parts(n, threads);
    int64_t blocks = (n + BLOCK - 1) / BLOCK, per = (blocks + parts - 1) / parts;
    Top tops[MAX_THREADS];
#pragma omp parallel for num_threads(parts) if (parts > 1) schedule(static)
    for (int p = 0; p < parts; p++) {
        Top s = part_top(cand, mags, tmp, cap, k, hint > 0 ? hint : 0.0f, p);
        int64_t last = (p + 1) * per < blocks ? (p + 1) * per : blocks;
        for (int64_t b = p * per; b < last; b++)
            compensate(&s, g, u, v, b * BLOCK, (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n, m, nesterov);
        tops[p] = s;
    }
    return merge(tops, parts, cand, mags);
}

/* Exactly the k largest |v| (the lower index first among ties), ascending, into cand[0..k), and the k-th
 * largest |v| into *kth.  given: the candidates compensate_all left (fewer than k: its hint was
 * too high, and v is scanned again from 0).  Where v holds NaN (an accumulator that overflowed) and fewer
 * than k other entries, the first NaNs are taken too: k entries whatever v holds. */
static void select_k(const float *v, int64_t n, int64_t k, int64_t given, int64_t *cand, float *mags, float *tmp,
                     int64_t cap, int threads, float *kth) {
    *kth = 0.0f;
    if (k >= n) {
        for (int64_t i = 0; i < n; i++) cand[i] = i, mags[i] = fabsf(v[i]);
        return;
    }
    int64_t c = given;
    if (c < k) {
        int parts = num_parts(n, threads);
        int64_t chunk = (n + parts - 1) / parts;
        Top tops[MAX_THREADS];
#pragma omp parallel for num_threads(parts) if (parts > 1) schedule(static)
        for (int p = 0; p < parts; p++) {
            Top s = part_top(cand, mags, tmp, cap, k, 0.0f, p);
            int64_t lo = p * chunk, hi = lo + chunk < n ? lo + chunk : n;
            if (lo < hi) scan(&s, v, lo, hi);
            tops[p] = s;
        }
        c = merge(tops, parts, cand, mags);
    }
    if (c < k) { /* NaN entries, never offered, make up the rest: all the others and the first NaNs, in order */
        int64_t nans = k - c;
        c = 0;
        for (int64_t i = 0; i < n && c < k; i++)
            if (!isnan(v[i]) || nans-- > 0) cand[c] = i, mags[c++] = fabsf(v[i]);
    }
    if (c > k) {
        *kth = keep_k(cand, mags, c, k, tmp);
    } else {
        *kth = mags[0];
        for (int64_t j = 1; j < k; j++) *kth = fminf(*kth, mags[j]);
    }
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

static int64_t nbytes(int64_t bits) { return (bits + 7) / 8; }

/* Elias-Fano code of ascending idx (the format of gradcomp.compressors.bits.encode_sorted): k low parts of
 * `low` bits each, most significant bit first, then the high parts in unary. */
static void encode_sorted(const int64_t *idx, int64_t k, int64_t n, uint8_t *code, int64_t code_bytes) {
    memset(code, 0, (size_t)code_bytes);
    int low = 0;
    for (int64_t q = n / k; q > 1; q >>= 1) low++;
    if (low) {
        uint64_t acc = 0, mask = (1ull << low) - 1; /* low < 57: acc never holds more than 63 bits */
        int held = 0;
        uint8_t *out = code;
        for (int64_t j = 0; j < k; j++) {
            acc = acc << low | ((uint64_t)idx[j] & mask), held += low;
            for (; held >= 8; held -= 8) *out++ = (uint8_t)(acc >> (held - 8));
        }
        if (held) *out = (uint8_t)(acc << (8 - held));
    }
    uint8_t *high = code + nbytes(k * low);
    for (int64_t j = 0; j < k; j++) {
        int64_t at = (idx[j] >> low) + j;
        high[at >> 3] |= (uint8_t)(128 >> (at & 7));
    }
}

/* Sum N workers' compact payloads of one tensor into total (float32, zeroed by the caller), in rank order:
 * total[idx] += half * scale, row r of codes (code_bytes each), half (k each) and scales being worker r's.
 * Returns 0; a corrupt code returns -1 - (the entries its row holds) for a wrong count, else -2 for indices
 * out of range or out of order (total is then partly summed: the caller drops it). */
int64_t gc_decompress(const uint8_t *codes, int64_t code_bytes, const uint16_t *half, const float *scales,
                      int64_t rows, int64_t k, int64_t n, float *total) {
    int low = 0;
    for (int64_t q = n / k; q > 1; q >>= 1) low++;
    int64_t split = nbytes(k * low), high_bits = k + ((n - 1) >> low) + 1;
    uint64_t mask = low ? (1ull << low) - 1 : 0;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *code = codes + r * code_bytes, *high = code + split, *in = code;
        const uint16_t *h = half + r * k;
        float s = scales[r];
        uint64_t acc = 0;
        int held = 0;
        int64_t j = 0, prev = -1, count = 0, full = high_bits / 8;
        for (int64_t byte = 0; byte < full; byte++) count += __builtin_popcount(high[byte]);
        if (high_bits % 8) count += __builtin_popcount(high[full] >> (8 - high_bits % 8));
        if (count != k) return -1 - count;
        for (int64_t byte = 0; byte * 8 < high_bits; byte++) {
            for (unsigned b = high[byte]; b;) {
                int bit = __builtin_clz(b) - 24; /* most significant first */
                int64_t p = byte * 8 + bit;
                b &= ~(128u >> bit);
                if (p >= high_bits) break; /* padding of the last byte */
                for (; held < low; held += 8) acc = acc << 8 | *in++;
                held -= low;
                int64_t i = (p - j) << low | (int64_t)((acc >> held) & mask);
                if (i >= n || i <= prev) return -2;
                total[i] += from_half(h[j]) * s;
                prev = i, j++;
            }
        }
    }
    return 0;
}

/* Payload of the k ascending idx of v (mag: their |v|), then v[idx] -= the value sent and (u != NULL)
 * u[idx] = 0.
 *   compact (code != NULL): half[k], scale[1], code[code_bytes]; the value sent is half * scale;
 *   plain: values[k] = v[idx], sent as they are, and the indices as int32 (idx32 != NULL) or int64 (idx64). */
static void finish(float *v, float *u, int64_t n, const int64_t *idx, const float *mag, int64_t k, uint16_t *half,
                   float *scale, uint8_t *code, int64_t code_bytes, float *values, int32_t *idx32, int64_t *idx64) {
    float s = 1.0f, inv = 1.0f;
    if (code) {
        float peak = 0.0f;
        for (int64_t j = 0; j < k; j++) peak = fmaxf(peak, mag[j]);
        if (peak > 0) {
            int e;
            frexpf(peak, &e); /* peak = f * 2**e, f in [0.5, 1) */
            s = ldexpf(1.0f, e - 15 < -126 ? -126 : e - 15);
        }
        *scale = s, inv = 1.0f / s;
        encode_sorted(idx, k, n, code, code_bytes);
    }
    for (int64_t j = 0; j < k; j++) {
        float x = v[idx[j]], sent = x;
        if (code) {
            half[j] = to_half(x * inv), sent = from_half(half[j]) * s;
        } else {
            values[j] = x;
            if (idx32) idx32[j] = (int32_t)idx[j];
            else idx64[j] = idx[j];
        }
        v[idx[j]] = x - sent;
        if (u) u[idx[j]] = 0.0f;
    }
}

/* ------------------------------------------------------------ the step */

/* gc_steps' arguments for one tensor: a row of int64 fields. */
enum {
    F_N, F_K,        /* its size and the entries to send */
    F_WIDE,          /* 1: its blocks are split over every thread (its candidate buffers hold threads * cap) */
    F_CAP,           /* candidates per buffer, more than k (or n) */
    F_CAND,          /* the offset of its candidate buffers in cand, mags and tmp */
    F_OUT,           /* the offset of its k entries in half, values, idx32 and idx64 */
    F_CODE, F_CODE_BYTES, /* its index code in code (compact wire) */
    F_INT32,         /* 1: its indices as int32, else int64 (plain wire) */
    F_SLOT,          /* its place in the call's addresses, hints and scale */
    F_FIELDS
};

/* What the tensors of one gc_steps call share: the method's settings and the buffers their rows point into. */
typedef struct {
    float m, lower;
    int nesterov, masking, compact;
    const int64_t *addresses;
    float *hints, *mags, *tmp, *scale, *values;
    int64_t *cand, *idx64;
    uint16_t *half;
    uint8_t *code;
    int32_t *idx32;
} Batch;

/* DGC's step on one tensor, its blocks split into `parts`: compensate_all from its hint, select_k (its
 * indices ascending at the front of its candidates), finish (u masked when masking), and its next hint.
 * Returns 1 when its hint was too high (v was read a second time), else 0. */
static int step(const Batch *b, const int64_t *row, int parts) {
    int64_t n = row[F_N], k = row[F_K], cap = row[F_CAP], at = row[F_CAND], out = row[F_OUT], slot = row[F_SLOT];
    const float *g = (const float *)(intptr_t)b->addresses[3 * slot];
    float *u = (float *)(intptr_t)b->addresses[3 * slot + 1], *v = (float *)(intptr_t)b->addresses[3 * slot + 2];
    int64_t *cand = b->cand + at;
    float *mags = b->mags + at, *tmp = b->tmp + at, kth;
    int64_t given = compensate_all(g, u, v, n, b->m, b->nesterov, k, b->hints[slot], cand, mags, tmp, cap, parts);
    select_k(v, n, k, given, cand, mags, tmp, cap, parts, &kth);
    if (b->compact)
        finish(v, b->masking ? u : NULL, n, cand, mags, k, b->half + out, b->scale + slot, b->code + row[F_CODE],
               row[F_CODE_BYTES], NULL, NULL, NULL);
    else
        finish(v, b->masking ? u : NULL, n, cand, mags, k, NULL, NULL, NULL, 0, b->values + out,
               row[F_INT32] ? b->idx32 + out : NULL, row[F_INT32] ? NULL : b->idx64 + out);
    b->hints[slot] = b->lower * kth;
    return given < k && k < n;
}

/* DGC's step on `count` tensors (rows of F_FIELDS fields, see above) in one call: the wide ones one after
 * the other, each split over every thread, then the others shared out among the threads, one tensor per
 * thread at a time, in the order of the rows (largest first balances the threads best).  addresses[3 * slot]
 * and the two after it: the tensor's gradient, momentum u and accumulator v (float32, n each); hints[slot]:
 * its starting threshold, replaced by `lower` times its k-th largest |v| (its next step's hint).  The
 * payloads: compact wire, half (at the row's F_OUT), scale[slot] and code (at F_CODE); plain wire, values
 * and the indices in idx32 (rows with F_INT32) or idx64, at F_OUT.  Returns how many tensors were read a
 * second time because their hint was too high. */
int64_t gc_steps(const int64_t *rows, int64_t count, const int64_t *addresses, float m, int nesterov, int masking,
                 int compact, float *hints, float lower, int64_t *cand, float *mags, float *tmp, int threads,
                 uint16_t *half, float *scale, uint8_t *code, float *values, int32_t *idx32, int64_t *idx64) {
    Batch b = {m, lower, nesterov, masking, compact, addresses, hints, mags, tmp, scale, values, cand, idx64, half,
               code, idx32};
    int64_t rescanned = 0;
    for (int64_t t = 0; t < count; t++)
        if (rows[t * F_FIELDS + F_WIDE]) rescanned += step(&b, rows + t * F_FIELDS, threads);
#pragma omp parallel for num_threads(threads) if (threads > 1 && count > 1) schedule(dynamic, 1) \
    reduction(+ : rescanned)
    for (int64_t t = 0; t < count; t++)
        if (!rows[t * F_FIELDS + F_WIDE]) rescanned += step(&b, rows + t * F_FIELDS, 1);
    return rescanned;
}
