/* Native CPU kernels of modscope's mask step (loaded by modscope/masks/native.py through ctypes).
 *
 * Each kernel does, in one pass over memory, what the step otherwise does as a chain of torch operations, with the
 * same floating-point operations in the same order: built with -ffp-contract=off and without -ffast-math, every
 * result is bit-identical to the torch path (native.py checks this on a small input before it uses a kernel).
 *
 * - modscope_uniforms: the uniforms torch.rand draws from a CPU torch.Generator, from the same Mersenne-Twister
 *   state (MT19937: Matsumoto and Nishimura, 1998), about ten times faster than torch's per-element loop;
 *   modscope_uniforms_many: the same for several generators, in parallel.
 * - modscope_keep: the effective weights 0 + [u > sigmoid(-l)] * W of every (task, sample).
 * - modscope_logit_grad: the straight-through gradient of the logits at temperature 1,
 *   sum over samples of (1 - u) e u / ((1 - u) e + u)^2 * g * W with e = exp(-l), computed over tiles so that a
 *   transposed g (a linear layer's weight gradient) is read in cache-sized pieces.
 * - modscope_adam_moments and modscope_adam_apply: torch.optim.Adam's single-tensor step (no weight decay, no
 *   AMSGrad) in two passes instead of seven, around torch's own square root of the second moment (torch's
 *   vectorized sqrt is not the correctly rounded one, so it stays torch's). The fused multiply-adds are where
 *   torch's vectorized lerp and addcmul have theirs.
 *
 * Built with -fopenmp where torch's own parallel backend is OpenMP: the library then uses the OpenMP runtime torch
 * has loaded (the same library name), so its loops run on torch's threads, as many as torch.get_num_threads() in the
 * calling thread. Every element's arithmetic is the same whatever the split, so the results do not depend on it.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define MT_N 624
#define MT_M 397
#define MT_MATRIX 0x9908b0dfu

int modscope_abi(void) { return 1; }

static uint32_t mt_mix(uint32_t upper, uint32_t lower) {
    uint32_t y = (upper & 0x80000000u) | (lower & 0x7fffffffu);
    return (y >> 1) ^ ((y & 1u) ? MT_MATRIX : 0u);
}

static void mt_twist(uint32_t *mt) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) mt[i] = mt[i + MT_M] ^ mt_mix(mt[i], mt[i + 1]);
    for (; i < MT_N - 1; i++) mt[i] = mt[i + MT_M - MT_N] ^ mt_mix(mt[i], mt[i + 1]);
    mt[MT_N - 1] = mt[MT_M - 1] ^ mt_mix(mt[MT_N - 1], mt[0]);
}

/* n uniforms in [0, 1) into out: the low 24 bits of each tempered 32-bit number times 2^-24, as torch.rand does for
 * float32. words: the 624 state words (stored as 64-bit integers, as in torch's generator state); pos: the index of
 * the next word to use (624: twist first). Both are updated. */
void modscope_uniforms(uint64_t *words, int64_t *pos, float *out, int64_t n) {
    uint32_t mt[MT_N];
    for (int i = 0; i < MT_N; i++) mt[i] = (uint32_t)words[i];
    int64_t p = *pos, done = 0;
    while (done < n) {
        if (p >= MT_N) {
            mt_twist(mt);
            p = 0;
        }
        int64_t take = MT_N - p < n - done ? MT_N - p : n - done;
        for (int64_t j = 0; j < take; j++) {
            uint32_t y = mt[p + j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            out[done + j] = (float)(y & 0xffffffu) * (1.0f / 16777216.0f);
        }
        p += take;
        done += take;
    }
    for (int i = 0; i < MT_N; i++) words[i] = mt[i];
    *pos = p;
}

/* modscope_uniforms for several generators at once, one per thread (each stream is serial, different streams not). */
void modscope_uniforms_many(uint64_t *const *words, int64_t *pos, float *const *out, int64_t n, int64_t count) {
#pragma omp parallel for schedule(dynamic, 1) if (count > 1)
    for (int64_t t = 0; t < count; t++) modscope_uniforms(words[t], pos + t, out[t], n);
}

/* Below this many elements a kernel runs in the calling thread alone (forking the OpenMP team costs more). */
#define PARALLEL_MIN 32768
#define CHUNK 16384

/* eff[k, s, i] = 0 + [u[k, s, i] > p[k, i]] * w[i]; eff is (G, S, n), contiguous. */
void modscope_keep(const float *u, int64_t u_task, int64_t u_sample, const float *p, int64_t p_task, const float *w,
                   float *eff, int64_t G, int64_t S, int64_t n) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK, jobs = G * S * chunks;
#pragma omp parallel for schedule(static) if (G * S * n >= PARALLEL_MIN)
    for (int64_t t = 0; t < jobs; t++) {
        int64_t ks = t / chunks, i0 = (t % chunks) * CHUNK, i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        int64_t k = ks / S, s = ks % S;
        const float *uk = u + k * u_task + s * u_sample, *pk = p + k * p_task;
        float *ek = eff + ks * n;
        for (int64_t i = i0; i < i1; i++) ek[i] = 0.0f + (float)(uk[i] > pk[i]) * w[i];
    }
}

#define TILE 64

#ifdef __AVX__
#include <immintrin.h>
/* dst[i * dst_stride + j] = src[j * src_stride + i] for an 8 x 8 block. */
static void transpose8(const float *src, int64_t src_stride, float *dst, int64_t dst_stride) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + src_stride);
    __m256 r2 = _mm256_loadu_ps(src + 2 * src_stride), r3 = _mm256_loadu_ps(src + 3 * src_stride);
    __m256 r4 = _mm256_loadu_ps(src + 4 * src_stride), r5 = _mm256_loadu_ps(src + 5 * src_stride);
    __m256 r6 = _mm256_loadu_ps(src + 6 * src_stride), r7 = _mm256_loadu_ps(src + 7 * src_stride);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + dst_stride, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * dst_stride, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * dst_stride, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * dst_stride, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * dst_stride, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * dst_stride, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * dst_stride, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

/* out[k, i, j] = (out[k, i, j] +) sum_s local(u, e) * g * w for a (rows, cols) weight.
 * u: (G, S, rows * cols) with the given task and sample strides; e: exp(-l), (G, rows * cols); w: (rows * cols);
 * g: (G, S, rows, cols) with arbitrary strides; out: (G, rows * cols) with the given task stride. The sum over the
 * samples runs in sample order from +0, as torch.sum does. */
void modscope_logit_grad(const float *u, int64_t u_task, int64_t u_sample, const float *g, int64_t g_task,
                         int64_t g_sample, int64_t g_row, int64_t g_col, const float *w, const float *e, int64_t e_task,
                         float *out, int64_t out_task, int64_t G, int64_t S, int64_t rows, int64_t cols, int accumulate) {
    int64_t row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
    int64_t tiles = row_tiles * col_tiles;
#pragma omp parallel for schedule(static) if (G * S * rows * cols >= PARALLEL_MIN)
    for (int64_t t = 0; t < G * tiles; t++) {
        float acc[TILE * TILE], tile[TILE * TILE];
        int64_t k = t / tiles, i0 = (t % tiles) / col_tiles * TILE, j0 = (t % tiles) % col_tiles * TILE;
        int64_t ni = rows - i0 < TILE ? rows - i0 : TILE, nj = cols - j0 < TILE ? cols - j0 : TILE;
        for (int64_t a = 0; a < TILE * TILE; a++) acc[a] = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            const float *us = u + k * u_task + s * u_sample, *ek = e + k * e_task;
            const float *gs = g + k * g_task + s * g_sample + i0 * g_row + j0 * g_col;
            int64_t stride = g_row; /* the row stride of the g values the inner loop reads */
            if (g_col != 1) { /* copy the tile of g into row order first, in 8 x 8 blocks */
                for (int64_t jb = 0; jb < nj; jb += 8)
                    for (int64_t ib = 0; ib < ni; ib += 8) {
                        int64_t je = jb + 8 < nj ? jb + 8 : nj, ie = ib + 8 < ni ? ib + 8 : ni;
#ifdef __AVX__
                        if (g_row == 1 && je - jb == 8 && ie - ib == 8) {
                            transpose8(gs + ib + jb * g_col, g_col, tile + ib * TILE + jb, TILE);
                            continue;
                        }
#endif
                        for (int64_t i = ib; i < ie; i++)
                            for (int64_t j = jb; j < je; j++) tile[i * TILE + j] = gs[i * g_row + j * g_col];
                    }
                gs = tile;
                stride = TILE;
            }
            for (int64_t i = 0; i < ni; i++) {
                int64_t at = (i0 + i) * cols + j0;
                const float *gi = gs + i * stride;
                float *ai = acc + i * TILE;
                for (int64_t j = 0; j < nj; j++) {
                    float uu = us[at + j];
                    float a = (1.0f - uu) * ek[at + j];
                    float b = a + uu;
                    b = b * b;
                    a = a * uu;
                    a = a / b;
                    a = a * gi[j];
                    a = a * w[at + j];
                    ai[j] = ai[j] + a;
                }
            }
        }
        float *ok = out + k * out_task;
        for (int64_t i = 0; i < ni; i++) {
            float *o = ok + (i0 + i) * cols + j0;
            const float *ai = acc + i * TILE;
            if (accumulate)
                for (int64_t j = 0; j < nj; j++) o[j] = o[j] + ai[j];
            else
                for (int64_t j = 0; j < nj; j++) o[j] = ai[j];
        }
    }
}

/* Adam's moments, as exp_avg.lerp_(g, w1) and exp_avg_sq.mul_(beta2).addcmul_(g, g, value=c2) compute them. */
void modscope_adam_moments(const float *g, float *m, float *v, int64_t n, float w1, float beta2, float c2) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = fmaf(w1, gi - m[i], m[i]);
        v[i] = fmaf(c2 * gi, gi, v[i] * beta2);
    }
}

/* Adam's update from root = sqrt(exp_avg_sq), as param.addcdiv_(exp_avg, root / bc2_root + eps, value=neg_step). */
void modscope_adam_apply(float *p, const float *m, const float *root, int64_t n, float bc2_root, float eps,
                         float neg_step) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float d = root[i] / bc2_root;
        d = d + eps;
        p[i] = p[i] + neg_step * m[i] / d;
    }
}
