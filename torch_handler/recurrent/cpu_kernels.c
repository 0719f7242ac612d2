/* The rule's step loops on CPUs: compiled twins of code in torch_handler/rules.py, in float
 * and double, for every cell type: step (the forward loop), the chunk coefficients
 * (coefficients, + step_factors for the LSTM) and step_backward.
 *
 * Why C: at small batches a step is a (rows x K) by (K x M) product and a few elementwise
 * operations over a few hundred numbers. Issued from Python as torch ops, each costs
 * microseconds of dispatch, more than its arithmetic; BLAS's path for two-row products is slow
 * too. Here one call runs a whole layer's forward loop, a chunk's coefficients or a whole
 * backward chunk: torch_handler/cpu_loops.py compiles this file once per machine (in the
 * background, cached) and calls it through ctypes; OpenMP threads take blocks of pairs.
 *
 * Layout, shared by every function:
 *   rows      the doubled batch, B = 2N: actual rows 0..N-1, reference rows N..2N-1; a
 *             thread serves the pairs p0..p1-1, i.e. rows p and N + p (rows never read one
 *             another, so threads on disjoint pairs never wait for each other);
 *   buffers   row-major (steps, B, columns), as the rules' forward_buffers;
 *   factors   the chunk's step_factors, row-major and pair-major: (tau, N, blocks, H); row b
 *             of either half reads pair b mod N's; the factor kernels read the buffers through
 *             a row map, rows (2N): pair p's actual row rows[p] and reference row rows[N + p]
 *             among the buffers' B rows (the forward may have run once per distinct row, see
 *             torch_handler/recurrent/row_layout.py; else rows[b] = b and B = 2N);
 *   halves    backward runs the rows of both halves (2) or the actual half only (1: the
 *             reference half's multipliers are all zero and stay so; rows never mix);
 *   mh, mc    (B, H) running multipliers of the state, updated in place (backward runs a chunk
 *             last step first and leaves the multipliers of the state before its first step);
 *   mz        (tau, B, width) written with each step's pre-activation multipliers;
 *   w         w_hh (gates, H) for backward; w_hh transposed, (H, gates), for forward; each
 *             with its packed copy (see add_product; cpu_loops.py packs it once per call);
 *   grad      the output multipliers of the chunk's last step minus one: step s (counting from
 *             the last) reads grad - s*g_st when s < with_grad, element (b, j) at
 *             b*g_sb + j*g_sh (autograd may hand expanded tensors: strides may be 0).
 *
 * Plain C99 with GCC/Clang vector extensions (so that products and exponentials vectorise on
 * any target); IEEE arithmetic (no -ffast-math). Sums run in another order than BLAS's, and
 * exp is evaluated by the polynomial below (within 2 ulp; sigmoid and tanh within 4): values
 * differ from torch's by rounding, as between two BLAS or libm builds, and the rule's
 * closed forms (no cancellation, no threshold on a pair's difference) are kept as they are.
 */
#ifndef REAL

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bytes per vector: the widest registers the target has (32 registers of 64 bytes with
 * AVX-512; otherwise 32-byte vectors, which AVX2's 16 registers and NEON's 32 hold without
 * spilling the products' accumulators). */
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#define ROW_BLOCK 8 /* rows per block of a product (add_product): 16 accumulators of 32 registers */
#else
#define VECTOR_BYTES 32
#define ROW_BLOCK 4 /* 8 accumulators of 16 registers */
#endif

/* Bytes per row of a block of packed weights (see add_product): cpu_loops.py packs to it. */
int64_t packed_block_bytes(void)
{
    return 2 * VECTOR_BYTES;
}

#define REAL float
#define NAME(name) name##_f32
#define INT int32_t
#define MANTISSA 23
#define EXP_BIAS 127
#include __FILE__
#undef REAL
#undef NAME
#undef INT
#undef MANTISSA
#undef EXP_BIAS

#define REAL double
#define NAME(name) name##_f64
#define INT int64_t
#define MANTISSA 52
#define EXP_BIAS 1023
#include __FILE__

#else /* the kernels, once per REAL */

typedef REAL NAME(vec) __attribute__((vector_size(VECTOR_BYTES)));
typedef INT NAME(ivec) __attribute__((vector_size(VECTOR_BYTES)));  /* INT is as wide as REAL */
#define VL ((int64_t)(sizeof(NAME(vec)) / sizeof(REAL)))
#define SPLAT(v) ((NAME(vec)){0} + (REAL)(v))
/* Lanewise mask ? a : b, the mask from a vector comparison (all bits set where true). */
#define SELECT(mask, a, b) \
    ((NAME(vec))(((NAME(ivec))(a) & (NAME(ivec))(mask)) | ((NAME(ivec))(b) & ~(NAME(ivec))(mask))))

/* Row r (0 <= r < 2n) of the pairs p0..p0+n-1: those rows of the actual half, then of the
 * reference half. */
static inline int64_t NAME(row)(int64_t r, int64_t p0, int64_t n, int64_t N)
{
    return r < n ? p0 + r : N + p0 + r - n;
}

/* Loads m (<= VL) numbers from p into a vector, zeros past them. A whole vector is one
 * unaligned load: a memcpy of variable length compiles to `rep movs` through the stack, which
 * cost more than the arithmetic on the vector (measured: the factor kernels 2-3x slower). */
static inline NAME(vec) NAME(load)(const REAL *p, int64_t m)
{
    NAME(vec) v;
    if (m == VL) {
        memcpy(&v, p, sizeof v);
        return v;
    }
    v = SPLAT(0);
    for (int64_t k = 0; k < m; ++k)
        v[k] = p[k];
    return v;
}

/* Stores the first m (<= VL) lanes of v at p (the same fast path as load). */
static inline void NAME(store)(REAL *p, NAME(vec) v, int64_t m)
{
    if (m == VL) {
        memcpy(p, &v, sizeof v);
        return;
    }
    for (int64_t k = 0; k < m; ++k)
        p[k] = v[k];
}

/* out[r][0:2VL] += a[r][:K] @ w for R rows, w a packed (K, 2VL) block: one function per R, so
 * that the loops over rows have constant trip counts and the 2R accumulators stay in registers
 * while the k loop streams w (R up to ROW_BLOCK: 8 rows in AVX-512's 32 registers, else 4). */
#define DEFINE_BLOCK(R)                                                                         \
    static void NAME(block##R)(int64_t K, const REAL *const *a, const REAL *w,                 \
                               REAL *const *out)                                               \
    {                                                                                          \
        NAME(vec) acc0[R], acc1[R];                                                            \
        for (int r = 0; r < R; ++r) {                                                          \
            memcpy(&acc0[r], out[r], sizeof(NAME(vec)));                                       \
            memcpy(&acc1[r], out[r] + VL, sizeof(NAME(vec)));                                  \
        }                                                                                      \
        for (int64_t k = 0; k < K; ++k) {                                                      \
            NAME(vec) w0, w1;                                                                  \
            memcpy(&w0, w + k * 2 * VL, sizeof(NAME(vec)));                                    \
            memcpy(&w1, w + k * 2 * VL + VL, sizeof(NAME(vec)));                               \
            for (int r = 0; r < R; ++r) {                                                      \
                const REAL s = a[r][k];                                                        \
                acc0[r] += s * w0;                                                             \
                acc1[r] += s * w1;                                                             \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < R; ++r) {                                                          \
            memcpy(out[r], &acc0[r], sizeof(NAME(vec)));                                       \
            memcpy(out[r] + VL, &acc1[r], sizeof(NAME(vec)));                                  \
        }                                                                                      \
    }
DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)
#if ROW_BLOCK == 8
DEFINE_BLOCK(5)
DEFINE_BLOCK(6)
DEFINE_BLOCK(7)
DEFINE_BLOCK(8)
#endif
#undef DEFINE_BLOCK

/* out[row] += a[row, :K] @ w for the first `rows` (n or 2n) rows of pairs p0..p0+n-1 (see row);
 * a rows lda apart, out rows ldo
 * apart; w (K, M) row-major, and packed: its first M - M mod 2VL columns as (M / 2VL, K, 2VL),
 * every block contiguous (so that the k loop reads memory in order). Blocked as BLAS blocks a
 * product: a (KB, 2VL) slice of w stays in the L1 cache while every block of rows runs over it,
 * and each row's sum still runs over k in order (the same rounding whatever the batch). */
#define KB 128
static void NAME(add_product)(int64_t p0, int64_t n, int64_t nrows, int64_t N, int64_t K, int64_t M, const REAL *a,
                              int64_t lda, const REAL *w, const REAL *packed, REAL *out, int64_t ldo)
{
    const int64_t mv = M / (2 * VL) * (2 * VL);
    for (int64_t j = 0; j < mv; j += 2 * VL)
        for (int64_t k0 = 0; k0 < K; k0 += KB) {
            const int64_t kb = K - k0 < KB ? K - k0 : KB;
            const REAL *slice = packed + j * K + k0 * 2 * VL;
            for (int64_t r0 = 0; r0 < nrows; r0 += ROW_BLOCK) {
                const int64_t rows = nrows - r0 < ROW_BLOCK ? nrows - r0 : ROW_BLOCK;
                const REAL *ar[ROW_BLOCK];
                REAL *outj[ROW_BLOCK];
                for (int64_t r = 0; r < rows; ++r) {
                    const int64_t b = NAME(row)(r0 + r, p0, n, N);
                    ar[r] = a + b * lda + k0;
                    outj[r] = out + b * ldo + j;
                }
                switch (rows) {
#if ROW_BLOCK == 8
                case 8: NAME(block8)(kb, ar, slice, outj); break;
                case 7: NAME(block7)(kb, ar, slice, outj); break;
                case 6: NAME(block6)(kb, ar, slice, outj); break;
                case 5: NAME(block5)(kb, ar, slice, outj); break;
#endif
                case 4: NAME(block4)(kb, ar, slice, outj); break;
                case 3: NAME(block3)(kb, ar, slice, outj); break;
                case 2: NAME(block2)(kb, ar, slice, outj); break;
                default: NAME(block1)(kb, ar, slice, outj); break;
                }
            }
        }
    for (int64_t r = 0; r < nrows; ++r) {  /* columns past the last full pair of vectors */
        const int64_t b = NAME(row)(r, p0, n, N);
        for (int64_t j = mv; j < M; ++j) {
            REAL acc = out[b * ldo + j];
            for (int64_t k = 0; k < K; ++k)
                acc += a[b * lda + k] * w[k * M + j];
            out[b * ldo + j] = acc;
        }
    }
}
#undef KB

/* --------------------------------------------------------------------------- exponentials */

/* e^x, within 2 ulp, for x clamped to the range where e^x and e^-x are normal numbers (so
 * 1/(1 + e^-x) is exact to rounding at both ends): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
 * then Cephes' polynomial (float) or Pade form (double) for e^r, scaled by 2^n through the exponent bits. */
static inline NAME(vec) NAME(exp)(NAME(vec) x)
{
#if MANTISSA == 23
    const REAL lo = -87.0f, hi = 87.0f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const REAL round = 12582912.0f; /* 1.5 * 2^23: adding and subtracting rounds to an integer */
#else
    const REAL lo = -708.0, hi = 708.0, ln2_hi = 6.93145751953125e-1, ln2_lo = 1.42860682030941723212e-6;
    const REAL round = 6755399441055744.0; /* 1.5 * 2^52 */
#endif
    const REAL log2e = (REAL)1.4426950408889634073599;
    x = SELECT(x < lo, SPLAT(lo), x);
    x = SELECT(x > hi, SPLAT(hi), x);
    const NAME(vec) shifted = x * log2e + round; /* round + n exactly: n in its low mantissa bits */
    NAME(vec) n = shifted - round;
    NAME(vec) r = (x - n * ln2_hi) - n * ln2_lo;
#if MANTISSA == 23
    NAME(vec) p = SPLAT(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    NAME(vec) e = p * (r * r) + r + 1.0f;
#else
    const NAME(vec) rr = r * r;
    const NAME(vec) px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr
                              + 9.99999999999999999910e-1);
    const NAME(vec) qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
                          + 2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
    NAME(vec) e = 1.0 + 2.0 * (px / (qx - px));
#endif
    /* 2^n from those bits: a packed double -> int64 conversion has no AVX2 instruction (the
     * compiler converted lane by lane, a third of the attention kernel's time). */
    NAME(ivec) bits = ((NAME(ivec))shifted - (NAME(ivec))SPLAT(round) + EXP_BIAS) << MANTISSA;
    return e * (NAME(vec))bits;
}

static inline NAME(vec) NAME(sigmoid)(NAME(vec) x)
{
    return 1 / (1 + NAME(exp)(-x));
}

/* tanh(x) by its Taylor series, for |x| < 1/16 (terms through x^11: the first omitted one is
 * below 2^-56 |x|), where the quotients below cancel. */
static inline NAME(vec) NAME(tanh_series)(NAME(vec) x)
{
    const NAME(vec) x2 = x * x;
    NAME(vec) p = SPLAT(-(REAL)1382 / 155925);
    p = p * x2 + (REAL)62 / 2835;
    p = p * x2 - (REAL)17 / 315;
    p = p * x2 + (REAL)2 / 15;
    p = p * x2 - (REAL)1 / 3;
    return x + x * x2 * p;
}

/* tanh(x) = sign(x) (1 - e^-2|x|) / (1 + e^-2|x|) (within 8 ulp), the series below 1/16. */
static inline NAME(vec) NAME(tanh)(NAME(vec) x)
{
    const NAME(vec) ax = SELECT(x < 0, -x, x);
    const NAME(vec) t = NAME(exp)(-2 * ax);
    const NAME(vec) q = (1 - t) / (1 + t);
    return SELECT(ax < (REAL)0.0625, NAME(tanh_series)(x), SELECT(x < 0, -q, q));
}

/* (1 - e^-d) / d by its Taylor series sum_k (-d)^k / (k+1)!, for 0 <= d < 1/4 (terms through
 * d^12: the first omitted one is below 2^-60), where the quotient cancels. */
static inline NAME(vec) NAME(one_minus_exp_neg_series)(NAME(vec) d)
{
    NAME(vec) p = SPLAT((REAL)1 / 6227020800);  /* 1/13! */
    static const REAL inverse_factorials[12] = {  /* 1/12!, ..., 1/2!, 1/1! with alternating signs */
        -(REAL)1 / 479001600, (REAL)1 / 39916800, -(REAL)1 / 3628800, (REAL)1 / 362880,
        -(REAL)1 / 40320, (REAL)1 / 5040, -(REAL)1 / 720, (REAL)1 / 120, -(REAL)1 / 24, (REAL)1 / 6,
        -(REAL)1 / 2, (REAL)1};
    for (int k = 0; k < 12; ++k)
        p = p * d + inverse_factorials[k];
    return p;
}

/* (1 - e^-d) / d for d >= 0 (1 at d = 0), without cancellation: the series below d = 1/4, the
 * quotient above (where e^-d < 0.78: within 4 ulp). */
static inline NAME(vec) NAME(one_minus_exp_neg_over)(NAME(vec) d)
{
    const NAME(ivec) small = (NAME(ivec))(d < (REAL)0.25);
    const NAME(vec) safe = SELECT(small, SPLAT(1), d);
    return SELECT(small, NAME(one_minus_exp_neg_series)(d), (1 - NAME(exp)(-safe)) / safe);
}

/* An operand x of a sigmoid with what the factors need of it, from one exponential E = e^-x:
 * σ(x) = 1 / (1 + E) and σ(-x) = E σ(x) (no 1 - σ(x): that would cancel where σ(x) -> 1). */
typedef struct {
    NAME(vec) x, e, pos, neg;
} NAME(operand);

static inline NAME(operand) NAME(operand_of)(NAME(vec) x)
{
    NAME(operand) o;
    o.x = x;
    o.e = NAME(exp)(-x);
    o.pos = 1 / (1 + o.e);
    o.neg = o.e * o.pos;
    return o;
}

/* The operand of x with its e and σ(x) read from a row of an operand cache (e at p, σ(x) at
 * p + H: written by the operands kernels below with operand_of, so the same bits), or
 * computed here when p is NULL. */
static inline NAME(operand) NAME(operand_at)(NAME(vec) x, const REAL *p, int64_t H, int64_t m)
{
    if (!p)
        return NAME(operand_of)(x);
    NAME(operand) o;
    o.x = x;
    o.e = NAME(load)(p, m);
    o.pos = NAME(load)(p + H, m);
    o.neg = o.e * o.pos;
    return o;
}

/* rescale_sigmoid(a, r) = (σ(a) - σ(r)) / (a - r) = σ(hi) σ(-lo) (1 - e^-(hi-lo)) / (hi - lo),
 * the closed form of rules.rescale_sigmoid (no cancellation, no threshold on a - r). */
static inline NAME(vec) NAME(rescale_sigmoid)(NAME(operand) a, NAME(operand) r)
{
    const NAME(ivec) a_hi = (NAME(ivec))(a.x > r.x);
    const NAME(vec) d = SELECT(a_hi, a.x - r.x, r.x - a.x);
    return SELECT(a_hi, a.pos, r.pos) * SELECT(a_hi, r.neg, a.neg) * NAME(one_minus_exp_neg_over)(d);
}

/* tanh(x) from the operand 2x (its e = e^-2x): (1 - e) / (1 + e), the series below 1/16. */
static inline NAME(vec) NAME(tanh_of_double)(NAME(operand) twice)
{
    const NAME(vec) x = twice.x * (REAL)0.5;
    const NAME(vec) ax = SELECT(x < 0, -x, x);
    return SELECT(ax < (REAL)0.0625, NAME(tanh_series)(x), (1 - twice.e) / (1 + twice.e));
}

/* f(v[0..m)) in place, vector by vector (the tail padded in a vector). */
#define APPLY(f, v, m)                                                            \
    for (int64_t j_ = 0; j_ < (m); j_ += VL) {                                    \
        const int64_t k_ = (m) - j_ < VL ? (m) - j_ : VL;                         \
        const NAME(vec) x_ = f(NAME(load)((v) + j_, k_));                         \
        NAME(store)((v) + j_, x_, k_);                                            \
    }

/* LSTMRule.step over T steps: z (T, B, 4H) holds the input projections (g's block doubled,
 * u_g = 2 z_g) and gets the recurrent part added; c (T, B, H) and out (T, B, H) written;
 * w_t = w_hh transposed (H, 4H); h0, c0 (B, H); gates (B, 4H) scratch. */
static void NAME(lstm_forward_pairs)(int64_t p0, int64_t p1, int64_t T, int64_t N, int64_t H, REAL *z,
                                     REAL *c, REAL *out, const REAL *w_t, const REAL *w_t_packed,
                                     const REAL *h0, const REAL *c0, REAL *gates)
{
    const int64_t B = 2 * N, G = 4 * H, n = p1 - p0;
    for (int64_t t = 0; t < T; ++t) {
        REAL *zt = z + t * B * G, *ct = c + t * B * H, *ht = out + t * B * H;
        const REAL *h_prev = t ? out + (t - 1) * B * H : h0, *c_prev = t ? c + (t - 1) * B * H : c0;
        NAME(add_product)(p0, n, 2 * n, N, H, G, h_prev, H, w_t, w_t_packed, zt, G);
        for (int64_t r = 0; r < 2 * n; ++r) {
            const int64_t b = NAME(row)(r, p0, n, N);
            REAL *s = gates + b * G;
            memcpy(s, zt + b * G, (size_t)G * sizeof(REAL));
            APPLY(NAME(sigmoid), s, G);  /* i, f, σ(u_g), o */
            const REAL *cp = c_prev + b * H;
            REAL *cb = ct + b * H, *hb = ht + b * H;
            for (int64_t j = 0; j < H; ++j)  /* c' = f c + i g, g = 2σ(u_g) - 1 */
                cb[j] = s[H + j] * cp[j] + s[j] * (2 * s[2 * H + j] - 1);
            memcpy(hb, cb, (size_t)H * sizeof(REAL));
            APPLY(NAME(tanh), hb, H);
            for (int64_t j = 0; j < H; ++j)  /* h' = o tanh(c') */
                hb[j] *= s[3 * H + j];
        }
    }
}

/* GRURule.step over T steps: gx (T, B, 3H) holds the input projections (the r and z biases of
 * both sides added, n's rows doubled) and gets its r and z columns completed to pre-activations;
 * hn (T, B, H) written with hn' = W_hn' h + b_hn'; out (T, B, H) written; w_rz_t (H, 2H) and
 * w_n_t (H, H) the transposed rows of w_hh (with packed copies); b_hn (H) or NULL; h0 (B, H);
 * gates (B, 2H) scratch. n = 2σ(gx_n' + r hn') - 1, h' = n + z (h - n). */
static void NAME(gru_forward_pairs)(int64_t p0, int64_t p1, int64_t T, int64_t N, int64_t H, REAL *gx,
                                    REAL *hn, REAL *out, const REAL *w_rz_t, const REAL *w_rz_packed,
                                    const REAL *w_n_t, const REAL *w_n_packed, const REAL *b_hn,
                                    const REAL *h0, REAL *gates)
{
    const int64_t B = 2 * N, G = 3 * H, n = p1 - p0;
    for (int64_t t = 0; t < T; ++t) {
        REAL *gxt = gx + t * B * G, *hnt = hn + t * B * H, *ht = out + t * B * H;
        const REAL *h_prev = t ? out + (t - 1) * B * H : h0;
        for (int64_t r = 0; r < 2 * n; ++r) {
            REAL *hb = hnt + NAME(row)(r, p0, n, N) * H;
            if (b_hn)
                memcpy(hb, b_hn, (size_t)H * sizeof(REAL));
            else
                memset(hb, 0, (size_t)H * sizeof(REAL));
        }
        NAME(add_product)(p0, n, 2 * n, N, H, 2 * H, h_prev, H, w_rz_t, w_rz_packed, gxt, G);
        NAME(add_product)(p0, n, 2 * n, N, H, H, h_prev, H, w_n_t, w_n_packed, hnt, H);
        for (int64_t r = 0; r < 2 * n; ++r) {
            const int64_t b = NAME(row)(r, p0, n, N);
            REAL *s = gates + b * 2 * H, *hb = ht + b * H;
            const REAL *gb = gxt + b * G, *hnb = hnt + b * H, *hp = h_prev + b * H;
            memcpy(s, gb, (size_t)(2 * H) * sizeof(REAL));
            APPLY(NAME(sigmoid), s, 2 * H);  /* r, z */
            for (int64_t j = 0; j < H; ++j)  /* u = gx_n' + r hn' */
                hb[j] = gb[2 * H + j] + s[j] * hnb[j];
            APPLY(NAME(sigmoid), hb, H);
            for (int64_t j = 0; j < H; ++j) {  /* n = 2(σ(u) - 1/2), h' = n + z (h - n) */
                const REAL n_j = (hb[j] - (REAL)0.5) * 2;
                hb[j] = n_j + s[H + j] * (hp[j] - n_j);
            }
        }
    }
}

/* RNNRule.step over T steps: pre (T, B, H) holds the input projections and gets the recurrent
 * part added; out (T, B, H) = tanh(pre) (relu = 0) or relu(pre) (relu = 1); w_t = w_hh
 * transposed (H, H), with its packed copy; h0 (B, H). */
static void NAME(rnn_forward_pairs)(int64_t p0, int64_t p1, int64_t T, int64_t N, int64_t H, int64_t relu,
                                    REAL *pre, REAL *out, const REAL *w_t, const REAL *w_t_packed,
                                    const REAL *h0)
{
    const int64_t B = 2 * N, n = p1 - p0;
    for (int64_t t = 0; t < T; ++t) {
        REAL *pt = pre + t * B * H, *ht = out + t * B * H;
        const REAL *h_prev = t ? out + (t - 1) * B * H : h0;
        NAME(add_product)(p0, n, 2 * n, N, H, H, h_prev, H, w_t, w_t_packed, pt, H);
        for (int64_t r = 0; r < 2 * n; ++r) {
            const int64_t b = NAME(row)(r, p0, n, N);
            REAL *hb = ht + b * H;
            memcpy(hb, pt + b * H, (size_t)H * sizeof(REAL));
            if (relu) {
                for (int64_t j = 0; j < H; ++j)
                    hb[j] = hb[j] > 0 ? hb[j] : 0;
            } else {
                APPLY(NAME(tanh), hb, H);
            }
        }
    }
}

/* LSTMRule.coefficients and step_factors for a chunk of tau steps (this function: its pair-steps
 * i0..i1-1, i = t N + p; they are independent): z (tau, B, 4H) its pre-activations (g's
 * doubled), c (tau, B, H) its cell states, c_first (B, H) the state before its first step;
 * writes fc, fp (tau, N, 5, H):
 *   F_c = [K_i, K_f, K_g, 0, mean f],  F_p = [A K_i, A K_f, A K_g, K_o, A mean f],
 *   K_i = R(u_i) mean(g), K_f = R(u_f) mean(c), K_g = 2 R(u_g) mean(i), K_o = R(u_o) mean(tanh c'),
 *   A = mean(o) R_tanh(c'), R the sigmoid's Rescale factor, g = 2σ(u_g) - 1. */
static void NAME(lstm_factors_rows)(int64_t i0, int64_t i1, int64_t N, int64_t H, const REAL *z,
                                    const REAL *c, const REAL *c_first, REAL *fc, REAL *fp,
                                    const int64_t *rows, int64_t B, const REAL *ops)
{
    const int64_t G = 4 * H;
    for (int64_t i = i0; i < i1; ++i) {  /* i = t N + p: step t of pair p */
        const int64_t t = i / N, p = i % N, row_a = rows[p], row_r = rows[N + p];
        const REAL *za = z + (t * B + row_a) * G, *zr = z + (t * B + row_r) * G;
        const REAL *state[4] = {  /* c'_a, c'_r, c_a, c_r (c: the state before the step) */
            c + (t * B + row_a) * H, c + (t * B + row_r) * H,
            t ? c + ((t - 1) * B + row_a) * H : c_first + row_a * H,
            t ? c + ((t - 1) * B + row_r) * H : c_first + row_r * H};
        const REAL *oa = ops ? ops + (t * B + row_a) * 10 * H : NULL;
        const REAL *or_ = ops ? ops + (t * B + row_r) * 10 * H : NULL;
        REAL *Fc = fc + i * 5 * H, *Fp = fp + i * 5 * H;
        for (int64_t j = 0; j < H; j += VL) {
            const int64_t m = H - j < VL ? H - j : VL;
            NAME(vec) R[4], mean[4], v[4];
            for (int k = 0; k < 4; ++k) {  /* the gates i, f, g (u_g), o */
                const NAME(operand) a = NAME(operand_at)(NAME(load)(za + k * H + j, m), oa ? oa + 2 * k * H + j : NULL, H, m);
                const NAME(operand) r = NAME(operand_at)(NAME(load)(zr + k * H + j, m), or_ ? or_ + 2 * k * H + j : NULL, H, m);
                R[k] = NAME(rescale_sigmoid)(a, r);
                mean[k] = (a.pos + r.pos) * (REAL)0.5;
            }
            for (int k = 0; k < 4; ++k)
                v[k] = NAME(load)(state[k] + j, m);
            const NAME(operand) c2_a = NAME(operand_at)(2 * v[0], oa ? oa + 8 * H + j : NULL, H, m);
            const NAME(operand) c2_r = NAME(operand_at)(2 * v[1], or_ ? or_ + 8 * H + j : NULL, H, m);
            const NAME(vec) mean_g = mean[2] * 2 - 1;
            NAME(vec) out_c[5], out_p[5];
            out_c[0] = R[0] * mean_g;
            out_c[1] = R[1] * ((v[2] + v[3]) * (REAL)0.5);
            out_c[2] = R[2] * mean[0] * 2;
            out_c[3] = SPLAT(0);
            out_c[4] = mean[1];
            const NAME(vec) A = NAME(rescale_sigmoid)(c2_a, c2_r) * 4 * mean[3];
            for (int k = 0; k < 5; ++k)
                out_p[k] = out_c[k] * A;
            out_p[3] = R[3] * ((NAME(tanh_of_double)(c2_a) + NAME(tanh_of_double)(c2_r)) * (REAL)0.5);
            for (int k = 0; k < 5; ++k) {
                NAME(store)(Fc + k * H + j, out_c[k], m);
                NAME(store)(Fp + k * H + j, out_p[k], m);
            }
        }
    }
}

/* GRURule.coefficients for a chunk (this function: its pair-steps i0..i1-1, i = t N + p): gx
 * (tau, B, 3H) with the r and z columns completed to pre-activations and n's doubled input
 * part, hn (tau, B, H) = hn', h (tau, B, H) the outputs, h_first (B, H) the state before the
 * chunk; writes kx, kh (tau, N, 3, H) and mean_z (tau, N, H):
 *   u = gx_n + r hn',  K_z = (mean(h) - mean(n)) R(pre_z),  K_n = 2 mean(1 - z) R(u),
 *   K_r = mean(hn') R(pre_r) K_n,  K_h = [K_r, K_z, K_n mean(r)],  n = 2σ(u) - 1. */
static void NAME(gru_factors_rows)(int64_t i0, int64_t i1, int64_t N, int64_t H, const REAL *gx,
                                   const REAL *hn, const REAL *h, const REAL *h_first, REAL *kx, REAL *kh,
                                   REAL *mean_z, const int64_t *rows, int64_t B, const REAL *ops)
{
    const int64_t G = 3 * H;
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / N, p = i % N, a = rows[p], b = rows[N + p];
        const REAL *ga = gx + (t * B + a) * G, *gr = gx + (t * B + b) * G;
        const REAL *hna = hn + (t * B + a) * H, *hnr = hn + (t * B + b) * H;
        const REAL *ha = t ? h + ((t - 1) * B + a) * H : h_first + a * H;
        const REAL *hr = t ? h + ((t - 1) * B + b) * H : h_first + b * H;
        const REAL *oa = ops ? ops + (t * B + a) * 4 * H : NULL, *or_ = ops ? ops + (t * B + b) * 4 * H : NULL;
        REAL *Kx = kx + i * G, *Kh = kh + i * G, *mz = mean_z + i * H;
        for (int64_t j = 0; j < H; j += VL) {
            const int64_t m = H - j < VL ? H - j : VL;
            const NAME(operand) r_a = NAME(operand_at)(NAME(load)(ga + j, m), oa ? oa + j : NULL, H, m);
            const NAME(operand) r_r = NAME(operand_at)(NAME(load)(gr + j, m), or_ ? or_ + j : NULL, H, m);
            const NAME(operand) z_a = NAME(operand_at)(NAME(load)(ga + H + j, m), oa ? oa + 2 * H + j : NULL, H, m);
            const NAME(operand) z_r = NAME(operand_at)(NAME(load)(gr + H + j, m), or_ ? or_ + 2 * H + j : NULL, H, m);
            const NAME(vec) hn_a = NAME(load)(hna + j, m), hn_r = NAME(load)(hnr + j, m);
            const NAME(operand) u_a = NAME(operand_of)(NAME(load)(ga + 2 * H + j, m) + r_a.pos * hn_a);
            const NAME(operand) u_r = NAME(operand_of)(NAME(load)(gr + 2 * H + j, m) + r_r.pos * hn_r);
            const NAME(vec) mean_n = (u_a.pos + u_r.pos) * (REAL)0.5 * 2 - 1;
            const NAME(vec) mean_h = (NAME(load)(ha + j, m) + NAME(load)(hr + j, m)) * (REAL)0.5;
            const NAME(vec) k_z = (mean_h - mean_n) * NAME(rescale_sigmoid)(z_a, z_r);
            const NAME(vec) k_n = (z_a.neg + z_r.neg) * (REAL)0.5 * NAME(rescale_sigmoid)(u_a, u_r) * 2;
            const NAME(vec) k_r = (hn_a + hn_r) * (REAL)0.5 * NAME(rescale_sigmoid)(r_a, r_r) * k_n;
            const NAME(vec) k_hn = k_n * ((r_a.pos + r_r.pos) * (REAL)0.5);
            const NAME(vec) m_z = (z_a.pos + z_r.pos) * (REAL)0.5;
            NAME(store)(Kx + j, k_r, m);
            NAME(store)(Kx + H + j, k_z, m);
            NAME(store)(Kx + 2 * H + j, k_n, m);
            NAME(store)(Kh + j, k_r, m);
            NAME(store)(Kh + H + j, k_z, m);
            NAME(store)(Kh + 2 * H + j, k_hn, m);
            NAME(store)(mz + j, m_z, m);
        }
    }
}

/* RNNRule.coefficients for a chunk (pair-steps i0..i1-1): pre (tau, B, H) the pre-activations;
 * writes rescale (tau, N, H), the Rescale factor of tanh (relu = 0) or relu (relu = 1). */
static void NAME(rnn_factors_rows)(int64_t i0, int64_t i1, int64_t N, int64_t H, int64_t relu,
                                   const REAL *pre, REAL *rescale, const int64_t *rows, int64_t B,
                                   const REAL *ops)
{
    for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / N, p = i % N;
        const REAL *pa = pre + (t * B + rows[p]) * H, *pr = pre + (t * B + rows[N + p]) * H;
        const REAL *oa = ops ? ops + (t * B + rows[p]) * 2 * H : NULL;
        const REAL *or_ = ops ? ops + (t * B + rows[N + p]) * 2 * H : NULL;
        REAL *R = rescale + i * H;
        for (int64_t j = 0; j < H; j += VL) {
            const int64_t m = H - j < VL ? H - j : VL;
            const NAME(vec) a = NAME(load)(pa + j, m), r = NAME(load)(pr + j, m);
            NAME(vec) f;
            if (relu) {  /* rules.rescale_relu: exact quotient, midpoint derivative at a = r */
                const NAME(vec) d = a - r, zero = SPLAT(0);
                const NAME(vec) relu_a = SELECT(a > 0, a, zero), relu_r = SELECT(r > 0, r, zero);
                const NAME(ivec) same = (NAME(ivec))(d == 0);
                const NAME(vec) quotient = (relu_a - relu_r) / SELECT(same, SPLAT(1), d);
                f = SELECT(same, SELECT(a + r > 0, SPLAT(1), zero), quotient);
            } else {  /* rules.rescale_tanh = 4 rescale_sigmoid(2a, 2r) */
                f = NAME(rescale_sigmoid)(NAME(operand_at)(2 * a, oa ? oa + j : NULL, H, m),
                                          NAME(operand_at)(2 * r, or_ ? or_ + j : NULL, H, m)) * 4;
            }
            NAME(store)(R + j, f, m);
        }
    }
}

/* The operands of a chunk's rows, once per row (this function: its row-steps i0..i1-1, i = t B
 * + b, of tau steps and B rows), for the factor kernels to read for every pair a row is in
 * (a row the forward ran once serves many pairs: see row_layout.py). ops (tau, B, K, 2, H):
 * operand k's e then σ. LSTM, K = 5: the gates i, f, u_g, o from z, then 2c'. */
static void NAME(lstm_operands_rows)(int64_t i0, int64_t i1, int64_t H, const REAL *z, const REAL *c, REAL *ops)
{
    for (int64_t i = i0; i < i1; ++i) {
        const REAL *zi = z + i * 4 * H, *ci = c + i * H;
        REAL *o = ops + i * 10 * H;
        for (int64_t j = 0; j < H; j += VL) {
            const int64_t m = H - j < VL ? H - j : VL;
            for (int k = 0; k < 5; ++k) {
                const NAME(operand) x = NAME(operand_of)(k < 4 ? NAME(load)(zi + k * H + j, m)
                                                               : 2 * NAME(load)(ci + j, m));
                NAME(store)(o + 2 * k * H + j, x.e, m);
                NAME(store)(o + (2 * k + 1) * H + j, x.pos, m);
            }
        }
    }
}

/* GRU, K = 2: r and z from gx. (Not u = gx_n + σ(r) hn': the compiler may contract that sum
 * into a fused multiply-add in one function and not in another, and the cache must give the
 * factor kernel's own bits.) */
static void NAME(gru_operands_rows)(int64_t i0, int64_t i1, int64_t H, const REAL *gx, REAL *ops)
{
    for (int64_t i = i0; i < i1; ++i) {
        const REAL *gi = gx + i * 3 * H;
        REAL *o = ops + i * 4 * H;
        for (int64_t j = 0; j < H; j += VL) {
            const int64_t m = H - j < VL ? H - j : VL;
            NAME(operand) x[2];
            x[0] = NAME(operand_of)(NAME(load)(gi + j, m));
            x[1] = NAME(operand_of)(NAME(load)(gi + H + j, m));
            for (int k = 0; k < 2; ++k) {
                NAME(store)(o + 2 * k * H + j, x[k].e, m);
                NAME(store)(o + (2 * k + 1) * H + j, x[k].pos, m);
            }
        }
    }
}

/* RNN with tanh, K = 1: 2 pre (tanh's Rescale factor is 4 rescale_sigmoid(2a, 2r)). */
static void NAME(rnn_operands_rows)(int64_t i0, int64_t i1, int64_t H, const REAL *pre, REAL *ops)
{
    for (int64_t i = i0; i < i1; ++i) {
        const REAL *pi = pre + i * H;
        REAL *o = ops + i * 2 * H;
        for (int64_t j = 0; j < H; j += VL) {
            const int64_t m = H - j < VL ? H - j : VL;
            const NAME(operand) x = NAME(operand_of)(2 * NAME(load)(pi + j, m));
            NAME(store)(o + j, x.e, m);
            NAME(store)(o + H + j, x.pos, m);
        }
    }
}

/* ------------------------------------------------------------------------------ backward */

/* mh[row] = grad row of step s (0 once s >= with_grad), for the first nrows rows of pairs
 * p0..p0+n-1. */
static void NAME(load_grad)(int64_t p0, int64_t n, int64_t nrows, int64_t N, int64_t H, REAL *mh,
                            const REAL *grad, int64_t s, int64_t with_grad, int64_t g_st, int64_t g_sb,
                            int64_t g_sh)
{
    for (int64_t r = 0; r < nrows; ++r) {
        const int64_t b = NAME(row)(r, p0, n, N);
        if (s >= with_grad) {
            memset(mh + b * H, 0, (size_t)H * sizeof(REAL));
            continue;
        }
        const REAL *g = grad - s * g_st + b * g_sb;
        for (int64_t j = 0; j < H; ++j)
            mh[b * H + j] = g[j * g_sh];
    }
}

/* LSTMRule.step_backward: [m_i, m_f, m_g, m_o, m_c] = m_c' F_c + m_h' F_p (the first 5H columns
 * of mz; m_c the fifth block); m_h = grad + [m_i m_f m_g m_o] @ w_hh, w (4H, H). */
static void NAME(lstm_backward_pairs)(int64_t p0, int64_t p1, int64_t tau, int64_t N, int64_t H,
                                      const REAL *fc, const REAL *fp, REAL *mh, REAL *mc, REAL *mz,
                                      int64_t width, const REAL *w, const REAL *w_packed, const REAL *grad,
                                      int64_t with_grad, int64_t g_st, int64_t g_sb, int64_t g_sh,
                                      int64_t halves)
{
    const int64_t B = 2 * N, F = 5 * H, n = p1 - p0;
    for (int64_t s = 0; s < tau; ++s) {
        const int64_t t = tau - 1 - s;
        REAL *z = mz + t * B * width;
        for (int64_t r = 0; r < halves * n; ++r) {
            const int64_t b = NAME(row)(r, p0, n, N);
            const REAL *fcb = fc + (t * N + b % N) * F, *fpb = fp + (t * N + b % N) * F;
            const REAL *hb = mh + b * H;
            REAL *cb = mc + b * H, *zb = z + b * width;
            for (int64_t k = 0; k < 5; ++k)
                for (int64_t j = 0; j < H; ++j)
                    zb[k * H + j] = cb[j] * fcb[k * H + j] + hb[j] * fpb[k * H + j];
            memcpy(cb, zb + 4 * H, (size_t)H * sizeof(REAL));
        }
        NAME(load_grad)(p0, n, halves * n, N, H, mh, grad, s, with_grad, g_st, g_sb, g_sh);
        NAME(add_product)(p0, n, halves * n, N, 4 * H, H, z, width, w, w_packed, mh, H);
    }
}

/* GRURule.step_backward: m_z = m_h' K_x; m_h = grad + m_h' mean(z) + (m_h' K_h) @ w_hh, w (3H, H);
 * K_x, K_h (tau, N, 3, H), mean_z (tau, N, H); side (B, 3H) scratch. */
static void NAME(gru_backward_pairs)(int64_t p0, int64_t p1, int64_t tau, int64_t N, int64_t H,
                                     const REAL *kx, const REAL *kh, const REAL *mean_z, REAL *mh, REAL *mz,
                                     int64_t width, REAL *side, const REAL *w, const REAL *w_packed,
                                     const REAL *grad, int64_t with_grad, int64_t g_st, int64_t g_sb,
                                     int64_t g_sh, int64_t halves)
{
    const int64_t B = 2 * N, F = 3 * H, n = p1 - p0;
    for (int64_t s = 0; s < tau; ++s) {
        const int64_t t = tau - 1 - s;
        REAL *z = mz + t * B * width;
        for (int64_t r = 0; r < halves * n; ++r) {
            const int64_t b = NAME(row)(r, p0, n, N), pair = t * N + b % N;
            const REAL *kxb = kx + pair * F, *khb = kh + pair * F, *mzb = mean_z + pair * H;
            REAL *hb = mh + b * H, *zb = z + b * width, *sb = side + b * F;
            for (int64_t k = 0; k < 3; ++k)
                for (int64_t j = 0; j < H; ++j) {
                    zb[k * H + j] = hb[j] * kxb[k * H + j];
                    sb[k * H + j] = hb[j] * khb[k * H + j];
                }
            for (int64_t j = 0; j < H; ++j)  /* the direct term z h: the last read of m_h' */
                hb[j] *= mzb[j];
            if (s < with_grad) {
                const REAL *g = grad - s * g_st + b * g_sb;
                for (int64_t j = 0; j < H; ++j)
                    hb[j] += g[j * g_sh];
            }
        }
        NAME(add_product)(p0, n, halves * n, N, 3 * H, H, side, F, w, w_packed, mh, H);
    }
}

/* RNNRule.step_backward: m_z = m_h' R; m_h = grad + m_z @ w_hh, w (H, H); R (tau, N, H). */
static void NAME(rnn_backward_pairs)(int64_t p0, int64_t p1, int64_t tau, int64_t N, int64_t H,
                                     const REAL *rescale, REAL *mh, REAL *mz, int64_t width, const REAL *w,
                                     const REAL *w_packed, const REAL *grad, int64_t with_grad, int64_t g_st,
                                     int64_t g_sb, int64_t g_sh, int64_t halves)
{
    const int64_t B = 2 * N, n = p1 - p0;
    for (int64_t s = 0; s < tau; ++s) {
        const int64_t t = tau - 1 - s;
        REAL *z = mz + t * B * width;
        for (int64_t r = 0; r < halves * n; ++r) {
            const int64_t b = NAME(row)(r, p0, n, N);
            const REAL *rb = rescale + (t * N + b % N) * H;
            for (int64_t j = 0; j < H; ++j)
                z[b * width + j] = mh[b * H + j] * rb[j];
        }
        NAME(load_grad)(p0, n, halves * n, N, H, mh, grad, s, with_grad, g_st, g_sb, g_sh);
        NAME(add_product)(p0, n, halves * n, N, H, H, z, width, w, w_packed, mh, H);
    }
}

/* ------------------------------------------------------------- entry points (ctypes calls) */

/* Each runs its _pairs function on every pair, the pairs split into blocks over `threads`
 * OpenMP threads (torch's own OpenMP runtime where the library links to it: cpu_loops.py):
 * `call` runs once per thread with its pairs p0..p1-1 and its index `thread` in the team. */
#ifdef _OPENMP
#define OVER_PAIRS(threads, N, call)                                                          \
    do {                                                                                      \
        const int team_ = (int)((threads) < (N) ? (threads) : (N));                           \
        _Pragma("omp parallel num_threads(team_)")                                            \
        {                                                                                     \
            const int64_t thread = omp_get_thread_num(), m_ = omp_get_num_threads();          \
            const int64_t p0 = (N) * thread / m_, p1 = (N) * (thread + 1) / m_;               \
            call;                                                                             \
        }                                                                                     \
    } while (0)
#else
#define OVER_PAIRS(threads, N, call)                                                          \
    do {                                                                                      \
        const int64_t p0 = 0, p1 = (N), thread = 0;                                           \
        (void)(threads);                                                                      \
        (void)thread;                                                                         \
        call;                                                                                 \
    } while (0)
#endif

void NAME(lstm_forward)(int64_t threads, int64_t T, int64_t N, int64_t H, REAL *z, REAL *c, REAL *out,
                        const REAL *w_t, const REAL *w_t_packed, const REAL *h0, const REAL *c0, REAL *gates)
{
    OVER_PAIRS(threads, N,
               NAME(lstm_forward_pairs)(p0, p1, T, N, H, z, c, out, w_t, w_t_packed, h0, c0, gates));
}

void NAME(gru_forward)(int64_t threads, int64_t T, int64_t N, int64_t H, REAL *gx, REAL *hn, REAL *out,
                       const REAL *w_rz_t, const REAL *w_rz_packed, const REAL *w_n_t, const REAL *w_n_packed,
                       const REAL *b_hn, const REAL *h0, REAL *gates)
{
    OVER_PAIRS(threads, N,
               NAME(gru_forward_pairs)(p0, p1, T, N, H, gx, hn, out, w_rz_t, w_rz_packed, w_n_t, w_n_packed,
                                       b_hn, h0, gates));
}

void NAME(rnn_forward)(int64_t threads, int64_t T, int64_t N, int64_t H, int64_t relu, REAL *pre, REAL *out,
                       const REAL *w_t, const REAL *w_t_packed, const REAL *h0)
{
    OVER_PAIRS(threads, N, NAME(rnn_forward_pairs)(p0, p1, T, N, H, relu, pre, out, w_t, w_t_packed, h0));
}

void NAME(lstm_factors)(int64_t threads, int64_t tau, int64_t N, int64_t H, const REAL *z, const REAL *c,
                        const REAL *c_first, REAL *fc, REAL *fp, const int64_t *rows, int64_t B,
                        const REAL *ops)
{
    /* every pair-step is independent: the threads split them all, not only the pairs */
    OVER_PAIRS(threads, tau * N, NAME(lstm_factors_rows)(p0, p1, N, H, z, c, c_first, fc, fp, rows, B, ops));
}

void NAME(gru_factors)(int64_t threads, int64_t tau, int64_t N, int64_t H, const REAL *gx, const REAL *hn,
                       const REAL *h, const REAL *h_first, REAL *kx, REAL *kh, REAL *mean_z,
                       const int64_t *rows, int64_t B, const REAL *ops)
{
    OVER_PAIRS(threads, tau * N,
               NAME(gru_factors_rows)(p0, p1, N, H, gx, hn, h, h_first, kx, kh, mean_z, rows, B, ops));
}

void NAME(rnn_factors)(int64_t threads, int64_t tau, int64_t N, int64_t H, int64_t relu, const REAL *pre,
                       REAL *rescale, const int64_t *rows, int64_t B, const REAL *ops)
{
    OVER_PAIRS(threads, tau * N, NAME(rnn_factors_rows)(p0, p1, N, H, relu, pre, rescale, rows, B, ops));
}

void NAME(lstm_operands)(int64_t threads, int64_t tau, int64_t B, int64_t H, const REAL *z, const REAL *c,
                         REAL *ops)
{
    OVER_PAIRS(threads, tau * B, NAME(lstm_operands_rows)(p0, p1, H, z, c, ops));
}

void NAME(gru_operands)(int64_t threads, int64_t tau, int64_t B, int64_t H, const REAL *gx, REAL *ops)
{
    OVER_PAIRS(threads, tau * B, NAME(gru_operands_rows)(p0, p1, H, gx, ops));
}

void NAME(rnn_operands)(int64_t threads, int64_t tau, int64_t B, int64_t H, const REAL *pre, REAL *ops)
{
    OVER_PAIRS(threads, tau * B, NAME(rnn_operands_rows)(p0, p1, H, pre, ops));
}

void NAME(lstm_backward)(int64_t threads, int64_t tau, int64_t N, int64_t H, const REAL *fc, const REAL *fp,
                         REAL *mh, REAL *mc, REAL *mz, int64_t width, const REAL *w, const REAL *w_packed,
                         const REAL *grad, int64_t with_grad, int64_t g_st, int64_t g_sb, int64_t g_sh,
                         int64_t halves)
{
    OVER_PAIRS(threads, N,
               NAME(lstm_backward_pairs)(p0, p1, tau, N, H, fc, fp, mh, mc, mz, width, w, w_packed, grad,
                                         with_grad, g_st, g_sb, g_sh, halves));
}

void NAME(gru_backward)(int64_t threads, int64_t tau, int64_t N, int64_t H, const REAL *kx, const REAL *kh,
                        const REAL *mean_z, REAL *mh, REAL *mz, int64_t width, REAL *side, const REAL *w,
                        const REAL *w_packed, const REAL *grad, int64_t with_grad, int64_t g_st, int64_t g_sb,
                        int64_t g_sh, int64_t halves)
{
    OVER_PAIRS(threads, N,
               NAME(gru_backward_pairs)(p0, p1, tau, N, H, kx, kh, mean_z, mh, mz, width, side, w, w_packed,
                                        grad, with_grad, g_st, g_sb, g_sh, halves));
}

void NAME(rnn_backward)(int64_t threads, int64_t tau, int64_t N, int64_t H, const REAL *rescale, REAL *mh,
                        REAL *mz, int64_t width, const REAL *w, const REAL *w_packed, const REAL *grad,
                        int64_t with_grad, int64_t g_st, int64_t g_sb, int64_t g_sh, int64_t halves)
{
    OVER_PAIRS(threads, N,
               NAME(rnn_backward_pairs)(p0, p1, tau, N, H, rescale, mh, mz, width, w, w_packed, grad,
                                        with_grad, g_st, g_sb, g_sh, halves));
}

/* ------------------------------------------------- the attention rule (float64 only) */

#if MANTISSA == 52
/* The scaled_dot_product_attention rule, the compiled twin of
 * torch_handler/ops/rules/attention.py (read its docstring for the rule): scores
 * S = scale q kᵀ + mask, the softmax rule (through log_softmax, as ops/rules/softmax.py) and the
 * bilinear rule twice, for one block (one pair's head) at a time, one query row at a time.
 *
 * Why: issued as torch ops the rule is some thirty float64 passes over (blocks, L, S) tensors
 * of a few MB each, every one allocated afresh; here a row's S scores stay in the cache, and
 * the Rescale factors of exp come from the exponentials already computed (no further exp).
 *
 * Operands, read and written in place through a layout table (see the operands' section below):
 * q and its multiplier mq (N, G, L, E) per half (0 actual, 1 reference), G blocks (heads) per
 * pair; k, mk (N, G, S, E); v, mv (N, G, S, F); m (N, G, L, F) the output's multiplier; mask
 * (L, S) additive (-inf where masked) or NULL. work: per thread, sdpa_work_f64 numbers. */
int64_t NAME(sdpa_work)(int64_t L, int64_t S, int64_t E, int64_t F)
{
    /* the rule's own, then both halves of the seven operands' blocks (see sdpa_blocks) */
    return 4 * S + 3 * L * S + 2 * E * S + F * S + L * E + S * E + 4 * (L * E + S * E + S * F) + 2 * L * F;
}

static inline REAL NAME(rescale_log)(REAL a, REAL r)
{
    /* ops/rules/unary.py's _rescale_log: (log hi - log lo) / d above x = d / lo = 1, else
     * log1p(x) / x / lo (1 / lo at x = 0). */
    const REAL lo = a < r ? a : r, hi = a < r ? r : a, d = hi - lo, x = d / lo;
    if (x > 1)
        return (log(hi) - log(lo)) / d;
    return (x == 0 ? 1 : log1p(x) / x) / lo;
}

/* R_exp(a, r) = (e^a - e^r) / (a - r) = e^hi (1 - e^-d) / d, d = |a - r|, from e_a = e^a and
 * e_r = e^r (no further exponential): the quotient (e^hi - e^lo) / d itself where d >= 1/4
 * (e^lo <= 0.78 e^hi there, so the difference loses at most 3 bits), e^hi times
 * one_minus_exp_neg_series below; 0 where a - r is NaN (both at -inf). */
static inline NAME(vec) NAME(rescale_exp)(NAME(vec) a, NAME(vec) r, NAME(vec) e_a, NAME(vec) e_r)
{
    NAME(vec) d = a - r;
    d = SELECT(d < 0, -d, d);
    d = SELECT(d == d, d, SPLAT(0));
    const NAME(ivec) a_hi = (NAME(ivec))(e_a > e_r);
    const NAME(vec) hi = SELECT(a_hi, e_a, e_r), lo = SELECT(a_hi, e_r, e_a);
    const NAME(ivec) small = (NAME(ivec))(d < (REAL)0.25);
    return SELECT(small, hi * NAME(one_minus_exp_neg_series)(d), (hi - lo) / SELECT(small, SPLAT(1), d));
}

/* x[0] + ... + x[n-1], a vector of partial sums at a time (a scalar sum waits on each add). */
static inline REAL NAME(total)(const REAL *x, int64_t n)
{
    NAME(vec) acc = SPLAT(0);
    for (int64_t j = 0; j < n; j += VL)
        acc += NAME(load)(x + j, n - j < VL ? n - j : VL);
    REAL t = 0;
    for (int64_t l = 0; l < VL; ++l)
        t += acc[l];
    return t;
}

/* out[0:cols] = sum_t<n coef[t * step] mat[t * ld + 0:cols]: a row times a matrix, summed in
 * registers (a sum through memory would wait on its own stores at every t) by four
 * independent chains of FMAs (one chain waits on its FMA's latency at every t): four vectors
 * of columns at a time, then two with even and odd t apart, then one (the last maybe partial).
 * Whole vectors are loaded with the constant length VL: a length known only at run time kept
 * the loads out of the FMAs (measured: most of the attention kernel's products). */
static inline void NAME(row_times)(REAL *restrict out, const REAL *restrict coef, int64_t n, int64_t step,
                                   const REAL *restrict mat, int64_t ld, int64_t cols)
{
    int64_t c = 0;
    for (; c + 4 * VL <= cols; c += 4 * VL) {
        NAME(vec) a0 = SPLAT(0), a1 = SPLAT(0), a2 = SPLAT(0), a3 = SPLAT(0);
        for (int64_t t = 0; t < n; ++t) {
            const REAL w = coef[t * step], *p = mat + t * ld + c;
            a0 += w * NAME(load)(p, VL);
            a1 += w * NAME(load)(p + VL, VL);
            a2 += w * NAME(load)(p + 2 * VL, VL);
            a3 += w * NAME(load)(p + 3 * VL, VL);
        }
        NAME(store)(out + c, a0, VL);
        NAME(store)(out + c + VL, a1, VL);
        NAME(store)(out + c + 2 * VL, a2, VL);
        NAME(store)(out + c + 3 * VL, a3, VL);
    }
    for (; c + 2 * VL <= cols; c += 2 * VL) {
        NAME(vec) a0 = SPLAT(0), a1 = SPLAT(0), a2 = SPLAT(0), a3 = SPLAT(0);
        int64_t t = 0;
        for (; t + 1 < n; t += 2) {
            const REAL w0 = coef[t * step], w1 = coef[(t + 1) * step];
            const REAL *p0 = mat + t * ld + c, *p1 = p0 + ld;
            a0 += w0 * NAME(load)(p0, VL);
            a1 += w0 * NAME(load)(p0 + VL, VL);
            a2 += w1 * NAME(load)(p1, VL);
            a3 += w1 * NAME(load)(p1 + VL, VL);
        }
        if (t < n) {
            const REAL w0 = coef[t * step], *p0 = mat + t * ld + c;
            a0 += w0 * NAME(load)(p0, VL);
            a1 += w0 * NAME(load)(p0 + VL, VL);
        }
        NAME(store)(out + c, a0 + a2, VL);
        NAME(store)(out + c + VL, a1 + a3, VL);
    }
    for (; c < cols; c += VL) {
        const int64_t m = cols - c < VL ? cols - c : VL;
        NAME(vec) a0 = SPLAT(0), a1 = SPLAT(0);
        int64_t t = 0;
        if (m == VL)
            for (; t + 1 < n; t += 2) {
                a0 += coef[t * step] * NAME(load)(mat + t * ld + c, VL);
                a1 += coef[(t + 1) * step] * NAME(load)(mat + (t + 1) * ld + c, VL);
            }
        for (; t < n; ++t)
            a0 += coef[t * step] * NAME(load)(mat + t * ld + c, m);
        NAME(store)(out + c, a0 + a1, m);
    }
}

/* Softmax over a row of S logits in both halves, first phase: z[h] (the logits, in place)
 * becomes z - c with c the max over both halves (common to the pair, so it cancels; 0 where
 * every logit is -inf), e[h] = exp(z) (0 below e^-708, so exactly 0 at -inf) and sum[h] = Σe. */
static inline void NAME(softmax_exp)(int64_t S, REAL *const z[2], REAL *const e[2], REAL sum[2])
{
    /* The max a vector at a time (a scalar max waits on the previous comparison at every j). */
    NAME(vec) best = SPLAT(-INFINITY);
    REAL c = -INFINITY;
    for (int64_t h = 0; h < 2; ++h) {
        int64_t j = 0;
        for (; j + VL <= S; j += VL) {
            const NAME(vec) x = NAME(load)(z[h] + j, VL);
            best = SELECT(x > best, x, best);
        }
        for (; j < S; ++j)
            c = z[h][j] > c ? z[h][j] : c;
    }
    for (int64_t l = 0; l < VL; ++l)
        c = best[l] > c ? best[l] : c;
    if (!(c > -INFINITY && c < INFINITY))
        c = 0;
    for (int64_t h = 0; h < 2; ++h) {
        for (int64_t j = 0; j < S; j += VL) {
            const int64_t n = S - j < VL ? S - j : VL;
            const NAME(vec) x = NAME(load)(z[h] + j, n) - c;
            NAME(store)(z[h] + j, x, n);
            NAME(store)(e[h] + j, SELECT(x < -708, SPLAT(0), NAME(exp)(x)), n);
        }
        sum[h] = NAME(total)(e[h], S);
    }
}

/* Second phase, the softmax rule through log_softmax (ops/rules/softmax.py; u = z - log Σe):
 * m[h], the output's multipliers on entry, becomes scale times the logits' multipliers:
 * m_u = m R_exp(u_a, u_r) (exp(u) = P), m_Σ = -Σ_j m_u R_log(Σ_a, Σ_r),
 * m_x = m_u + m_Σ R_exp(z_a, z_r). */
static inline void NAME(softmax_multipliers)(int64_t S, REAL *const z[2], REAL *const e[2], const REAL sum[2],
                                             REAL *const m[2], REAL scale)
{
    const REAL log_sum[2] = {log(sum[0]), log(sum[1])}, inv_sum[2] = {1 / sum[0], 1 / sum[1]};
    const REAL r_log = NAME(rescale_log)(sum[0], sum[1]);
    for (int64_t j = 0; j < S; j += VL) {
        const int64_t n = S - j < VL ? S - j : VL;
        const NAME(vec) za = NAME(load)(z[0] + j, n), zr = NAME(load)(z[1] + j, n);
        const NAME(vec) pa = NAME(load)(e[0] + j, n) * inv_sum[0], pr = NAME(load)(e[1] + j, n) * inv_sum[1];
        const NAME(vec) r_u = NAME(rescale_exp)(za - log_sum[0], zr - log_sum[1], pa, pr);
        for (int64_t h = 0; h < 2; ++h)
            NAME(store)(m[h] + j, NAME(load)(m[h] + j, n) * r_u, n);
    }
    const REAL m_sum[2] = {-NAME(total)(m[0], S) * r_log, -NAME(total)(m[1], S) * r_log};
    for (int64_t j = 0; j < S; j += VL) {
        const int64_t n = S - j < VL ? S - j : VL;
        const NAME(vec) za = NAME(load)(z[0] + j, n), zr = NAME(load)(z[1] + j, n);
        const NAME(vec) r_z = NAME(rescale_exp)(za, zr, NAME(load)(e[0] + j, n), NAME(load)(e[1] + j, n));
        for (int64_t h = 0; h < 2; ++h)
            NAME(store)(m[h] + j, (NAME(load)(m[h] + j, n) + m_sum[h] * r_z) * scale, n);
    }
}

static void NAME(sdpa_block)(int64_t L, int64_t S, int64_t E, int64_t F, REAL scale, const REAL *restrict q[2],
                             const REAL *restrict k[2], const REAL *restrict v[2], const REAL *restrict m[2],
                             const REAL *restrict mask, REAL *restrict mq[2], REAL *restrict mk[2],
                             REAL *restrict mv[2], REAL *restrict work)
{
    REAL *z[2] = {work, work + S}, *e[2] = {work + 2 * S, work + 3 * S};
    REAL *pbar = work + 4 * S;                               /* mean probabilities (L, S) */
    REAL *mx[2] = {pbar + L * S, pbar + 2 * L * S};         /* the scores' multipliers (L, S) */
    REAL *kt[2] = {pbar + 3 * L * S, pbar + 3 * L * S + E * S};  /* k transposed, (E, S) */
    REAL *vbar_t = kt[1] + E * S;                            /* mean of v, transposed (F, S) */
    REAL *qbar = vbar_t + F * S, *kbar = qbar + L * E;       /* means (L, E), (S, E) */
    for (int64_t h = 0; h < 2; ++h)
        for (int64_t j = 0; j < S; ++j)
            for (int64_t c = 0; c < E; ++c)
                kt[h][c * S + j] = k[h][j * E + c];
    for (int64_t j = 0; j < S; ++j)
        for (int64_t f = 0; f < F; ++f)
            vbar_t[f * S + j] = (v[0][j * F + f] + v[1][j * F + f]) * 0.5;
    for (int64_t t = 0; t < L * E; ++t)
        qbar[t] = (q[0][t] + q[1][t]) * 0.5;
    for (int64_t t = 0; t < S * E; ++t)
        kbar[t] = (k[0][t] + k[1][t]) * 0.5;
    for (int64_t i = 0; i < L; ++i) {
        /* Scores of row i in both halves (scale q kᵀ + mask), then softmax's exponentials. */
        REAL sum[2];
        for (int64_t h = 0; h < 2; ++h) {
            REAL *restrict s = z[h];
            NAME(row_times)(s, q[h] + i * E, E, 1, kt[h], S, S);
            if (mask)
                for (int64_t j = 0; j < S; ++j)
                    s[j] = s[j] * scale + mask[i * S + j];
            else
                for (int64_t j = 0; j < S; ++j)
                    s[j] *= scale;
        }
        NAME(softmax_exp)(S, z, e, sum);
        /* P = e / Σe; m_P = m mean(v)ᵀ per half (the bilinear rule of P @ v; m_v after the rows). */
        REAL *restrict p_row = pbar + i * S;
        const REAL inv_sum[2] = {1 / sum[0], 1 / sum[1]};
        for (int64_t j = 0; j < S; ++j)
            p_row[j] = (e[0][j] * inv_sum[0] + e[1][j] * inv_sum[1]) * 0.5;
        REAL *mp[2] = {mx[0] + i * S, mx[1] + i * S};
        for (int64_t h = 0; h < 2; ++h)
            NAME(row_times)(mp[h], m[h] + i * F, F, 1, vbar_t, S, S);
        NAME(softmax_multipliers)(S, z, e, sum, mp, scale);
        /* The bilinear rule of the scores, row i: m_q = (scale m_S) mean(k). */
        for (int64_t h = 0; h < 2; ++h)
            NAME(row_times)(mq[h] + i * E, mp[h], S, 1, kbar, E, E);
    }
    /* Over every row: m_v = mean(P)ᵀ m and m_k = (scale m_S)ᵀ mean(q), a row of each per key. */
    for (int64_t h = 0; h < 2; ++h)
        for (int64_t j = 0; j < S; ++j) {
            NAME(row_times)(mv[h] + j * F, pbar + j, L, S, m[h], F, F);
            NAME(row_times)(mk[h] + j * E, mx[h] + j, L, S, qbar, E, E);
        }
}

/* The operands in place. Each is described by LAYOUT numbers of a table: the addresses of its
 * actual and reference halves, whether it is float32 (else float64), and its strides in
 * elements over (pair n, block g, row, column); any strides, 0 included (an operand expanded
 * over the blocks). Why: the rule's operands are float32 views into the model's tensors, and
 * copying them into float64 buffers from Python (and the multipliers back) cost about as much
 * as the rule's arithmetic (measured on the 2-core VM: 1.7 ms beside a 3.0 ms kernel for the
 * attention model's 32 pairs); a block's few hundred numbers are converted here instead. */
enum { OPERAND_Q, OPERAND_K, OPERAND_V, OPERAND_M, OPERAND_MQ, OPERAND_MK, OPERAND_MV, LAYOUT = 7 };

/* The element loop of load_block and store_block: `statement` for element (i, c) of a
 * (rows, cols) block, at offset at_ in the operand (row stride sr, column stride sc). Rows of
 * contiguous columns (the usual layout) have a loop of their own: with a stride known only at
 * run time the conversions ran an element at a time. */
#define BLOCK_ELEMENTS(statement)                                                             \
    do {                                                                                      \
        if (sc == 1)                                                                          \
            for (int64_t i = 0; i < rows; ++i)                                                \
                for (int64_t c = 0; c < cols; ++c) {                                          \
                    const int64_t at_ = i * sr + c;                                           \
                    statement;                                                                \
                }                                                                             \
        else                                                                                  \
            for (int64_t i = 0; i < rows; ++i)                                                \
                for (int64_t c = 0; c < cols; ++c) {                                          \
                    const int64_t at_ = i * sr + c * sc;                                      \
                    statement;                                                                \
                }                                                                             \
    } while (0)

/* dst (rows, cols), float64 contiguous <- block (n, g) of half h of the operand `op`. */
static void NAME(load_block)(REAL *restrict dst, const int64_t *op, int64_t h, int64_t n, int64_t g, int64_t rows,
                             int64_t cols)
{
    const int64_t at = n * op[3] + g * op[4], sr = op[5], sc = op[6];
    if (op[2]) {
        const float *restrict p = (const float *)(intptr_t)op[h] + at;
        BLOCK_ELEMENTS(dst[i * cols + c] = (REAL)p[at_]);
    } else {
        const double *restrict p = (const double *)(intptr_t)op[h] + at;
        BLOCK_ELEMENTS(dst[i * cols + c] = p[at_]);
    }
}

/* Block (n, g) of half h of the operand `op` <- src (rows, cols), rounded to float32 there. */
static void NAME(store_block)(const int64_t *op, int64_t h, int64_t n, int64_t g, const REAL *restrict src,
                              int64_t rows, int64_t cols)
{
    const int64_t at = n * op[3] + g * op[4], sr = op[5], sc = op[6];
    if (op[2]) {
        float *restrict p = (float *)(intptr_t)op[h] + at;
        BLOCK_ELEMENTS(p[at_] = (float)src[i * cols + c]);
    } else {
        double *restrict p = (double *)(intptr_t)op[h] + at;
        BLOCK_ELEMENTS(p[at_] = src[i * cols + c]);
    }
}
#undef BLOCK_ELEMENTS

/* The blocks b0..b1-1 of sdpa_rule (block b is pair b / G's block b % G), each loaded into
 * float64 copies after the rule's own work, its multipliers stored from there. */
static void NAME(sdpa_blocks)(int64_t b0, int64_t b1, int64_t G, int64_t L, int64_t S, int64_t E, int64_t F,
                              REAL scale, const int64_t *ops, const REAL *mask, REAL *work)
{
    const int64_t rows[LAYOUT] = {L, S, S, L, L, S, S}, cols[LAYOUT] = {E, E, F, F, E, E, F};
    REAL *block[LAYOUT][2], *next = work + 4 * S + 3 * L * S + 2 * E * S + F * S + L * E + S * E;
    for (int k = 0; k < LAYOUT; ++k)
        for (int h = 0; h < 2; ++h) {
            block[k][h] = next;
            next += rows[k] * cols[k];
        }
    const REAL *in[4][2];
    for (int k = 0; k < 4; ++k)
        for (int h = 0; h < 2; ++h)
            in[k][h] = block[k][h];
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / G, g = b % G;
        for (int k = OPERAND_Q; k <= OPERAND_M; ++k)
            for (int h = 0; h < 2; ++h)
                NAME(load_block)(block[k][h], ops + k * LAYOUT, h, n, g, rows[k], cols[k]);
        NAME(sdpa_block)(L, S, E, F, scale, in[OPERAND_Q], in[OPERAND_K], in[OPERAND_V], in[OPERAND_M], mask,
                         block[OPERAND_MQ], block[OPERAND_MK], block[OPERAND_MV], work);
        for (int k = OPERAND_MQ; k <= OPERAND_MV; ++k)
            for (int h = 0; h < 2; ++h)
                NAME(store_block)(ops + k * LAYOUT, h, n, g, block[k][h], rows[k], cols[k]);
    }
}

/* Entry point: every block (N pairs times G), split over `threads` OpenMP threads; ops the
 * layout table (LAYOUT numbers per operand, in the order q, k, v, m, mq, mk, mv); work holds
 * threads times sdpa_work numbers (each thread its own). */
void NAME(sdpa_rule)(int64_t threads, int64_t N, int64_t G, int64_t L, int64_t S, int64_t E, int64_t F, REAL scale,
                     const int64_t *ops, const REAL *mask, REAL *work)
{
    const int64_t w = NAME(sdpa_work)(L, S, E, F);
    OVER_PAIRS(threads, N * G, NAME(sdpa_blocks)(p0, p1, G, L, S, E, F, scale, ops, mask, work + thread * w));
}

/* The softmax rule over the last axis alone (ops/rules/softmax.py's softmax), float64 within:
 * ops the layout table (see the operands' section above) of x, m and out, each (N, R, 1, S) per
 * half, row r of the N R rows being (r / R, r % R); work: per thread, softmax_work numbers
 * (the row's z, e and multipliers, both halves). */
static void NAME(softmax_rows)(int64_t r0, int64_t r1, int64_t R, int64_t S, const int64_t *ops, REAL *work)
{
    REAL *z[2] = {work, work + S}, *e[2] = {work + 2 * S, work + 3 * S}, *o[2] = {work + 4 * S, work + 5 * S};
    for (int64_t r = r0; r < r1; ++r) {
        REAL sum[2];
        for (int64_t h = 0; h < 2; ++h) {
            NAME(load_block)(z[h], ops, h, r / R, r % R, 1, S);
            NAME(load_block)(o[h], ops + LAYOUT, h, r / R, r % R, 1, S);
        }
        NAME(softmax_exp)(S, z, e, sum);
        NAME(softmax_multipliers)(S, z, e, sum, o, 1);
        for (int64_t h = 0; h < 2; ++h)
            NAME(store_block)(ops + 2 * LAYOUT, h, r / R, r % R, o[h], 1, S);
    }
}

int64_t NAME(softmax_work)(int64_t S)
{
    return 6 * S;
}

void NAME(softmax_rule)(int64_t threads, int64_t rows, int64_t R, int64_t S, const int64_t *ops, REAL *work)
{
    OVER_PAIRS(threads, rows, NAME(softmax_rows)(p0, p1, R, S, ops, work + thread * NAME(softmax_work)(S)));
}

/* a[0] b[0] + ... + a[n-1] b[n-1], a vector of partial sums at a time (as total). */
static inline REAL NAME(dot)(const REAL *a, const REAL *b, int64_t n)
{
    NAME(vec) acc = SPLAT(0);
    for (int64_t j = 0; j < n; j += VL) {
        const int64_t m = n - j < VL ? n - j : VL;
        acc += NAME(load)(a + j, m) * NAME(load)(b + j, m);
    }
    REAL t = 0;
    for (int64_t l = 0; l < VL; ++l)
        t += acc[l];
    return t;
}

/* The layer_norm / rms_norm rule over rows of n numbers (ops/rules/norms.py's layer_norm and
 * rms_norm, read their docstrings for the rule), float64: u = x - mean(x) (layer_norm; u = x for
 * rms_norm), v = mean(u²) + eps, y = u rsqrt(v) weight. Per half h and row:
 * m_y0 = m weight; m_s = Σ m_y0 (u_a + u_r) / 2; m_v = m_s R_rsqrt(v_a, v_r);
 * m_u = m_y0 (rsqrt(v_a) + rsqrt(v_r)) / 2 + (m_v / n) (u_a + u_r); layer_norm m_x = m_u - mean(m_u).
 * Why: as torch ops the rule is some thirty float64 passes over (2, rows, n), each a fresh
 * allocation, for a few hundred numbers per row; here a row's numbers stay in the cache.
 * ops: the layout table (see the operands' section above) of x, m and out, each (N, R, 1, n) per
 * half, row r of the N R rows being (r / R, r % R); weight (n) or NULL; work: per thread,
 * norm_work numbers. */
static void NAME(norm_rows)(int64_t r0, int64_t r1, int64_t R, int64_t n, int64_t centre, REAL eps,
                            const int64_t *ops, const REAL *weight, REAL *work)
{
    REAL *u[2] = {work, work + n}, *restrict both = work + 2 * n; /* both = u_a + u_r */
    REAL *o[2] = {work + 3 * n, work + 4 * n};
    for (int64_t r = r0; r < r1; ++r) {
        REAL v[2];
        for (int64_t h = 0; h < 2; ++h) {
            REAL *restrict uh = u[h];
            NAME(load_block)(uh, ops, h, r / R, r % R, 1, n);
            const REAL mean = centre ? NAME(total)(uh, n) / (REAL)n : 0;
            for (int64_t j = 0; j < n; ++j)
                uh[j] -= mean;
            v[h] = NAME(dot)(uh, uh, n) / (REAL)n + eps;
        }
        for (int64_t j = 0; j < n; ++j)
            both[j] = u[0][j] + u[1][j];
        const REAL sa = sqrt(v[0]), sr = sqrt(v[1]);
        const REAL r_rsqrt = -1.0 / (sa * sr * (sa + sr)), s_mean = (1 / sa + 1 / sr) * 0.5;
        for (int64_t h = 0; h < 2; ++h) {
            REAL *restrict oh = o[h];
            NAME(load_block)(oh, ops + LAYOUT, h, r / R, r % R, 1, n);
            if (weight)
                for (int64_t j = 0; j < n; ++j)
                    oh[j] *= weight[j]; /* m_y0 */
            const REAL m_v = NAME(dot)(oh, both, n) * 0.5 * r_rsqrt / (REAL)n;
            for (int64_t j = 0; j < n; ++j)
                oh[j] = oh[j] * s_mean + m_v * both[j];
            if (centre) {
                const REAL mean = NAME(total)(oh, n) / (REAL)n;
                for (int64_t j = 0; j < n; ++j)
                    oh[j] -= mean;
            }
            NAME(store_block)(ops + 2 * LAYOUT, h, r / R, r % R, oh, 1, n);
        }
    }
}

int64_t NAME(norm_work)(int64_t n)
{
    return 5 * n;
}

void NAME(norm_rule)(int64_t threads, int64_t rows, int64_t R, int64_t n, int64_t centre, REAL eps,
                     const int64_t *ops, const REAL *weight, REAL *work)
{
    OVER_PAIRS(threads, rows, NAME(norm_rows)(p0, p1, R, n, centre, eps, ops, weight, work + thread * 5 * n));
}

/* Element i of half h of a contiguous operand of the layout table (its strides unused). */
static inline REAL NAME(element)(const int64_t *op, int64_t h, int64_t i)
{
    return op[2] ? (REAL)((const float *)(intptr_t)op[h])[i] : ((const double *)(intptr_t)op[h])[i];
}

static inline void NAME(set_element)(const int64_t *op, int64_t h, int64_t i, REAL value)
{
    if (op[2])
        ((float *)(intptr_t)op[h])[i] = (float)value;
    else
        ((double *)(intptr_t)op[h])[i] = value;
}

/* gelu's rule (approximate="none"), ops/rules/unary.py's _rescale_gelu and _rescale_normal_cdf
 * (read them for the rule): m_x = m R with R = mean(Φ(a), Φ(r)) + mean(a, r) R_Φ(a, r), R_Φ the
 * midpoint series where d (1 + |mid|) < 1e-2, else the difference quotient of the smaller tail.
 * Why: as torch ops the rule is some thirty passes (six erfc among them) over a few thousand
 * numbers, each a dispatch and a fresh allocation; here one pass, and the lower tail's erfc
 * values are Φ's own. ops: the layout table of x, m and out, each n contiguous numbers per half. */
static void NAME(gelu_range)(int64_t i0, int64_t i1, const int64_t *ops)
{
    const REAL s = 0.70710678118654752440, inv_sqrt_2pi = 0.39894228040143267794;
    for (int64_t i = i0; i < i1; ++i) {
        const REAL xa = NAME(element)(ops, 0, i), xr = NAME(element)(ops, 1, i);
        const REAL lo = xa < xr ? xa : xr, hi = xa < xr ? xr : xa, d = hi - lo;
        const REAL mid = (xa + xr) * 0.5, cdf_a = 0.5 * erfc(-xa * s), cdf_r = 0.5 * erfc(-xr * s);
        REAL r_phi;
        if (d * (1 + fabs(mid)) < 1e-2) {
            const REAL m2 = mid * mid, d2 = d * d;
            r_phi = exp(-0.5 * m2) * inv_sqrt_2pi * (1 + (m2 - 1) * d2 / 24 + (m2 * m2 - 6 * m2 + 3) * (d2 * d2) / 1920);
        } else if (mid > 0) {
            r_phi = (erfc(lo * s) - erfc(hi * s)) * 0.5 / d;
        } else {
            /* (erfc(-hi/√2) - erfc(-lo/√2)) / 2 = Φ(hi) - Φ(lo), halving being exact */
            r_phi = (xa < xr ? cdf_r - cdf_a : cdf_a - cdf_r) / d;
        }
        const REAL factor = (cdf_a + cdf_r) * 0.5 + (xa + xr) * 0.5 * r_phi;
        for (int64_t h = 0; h < 2; ++h)
            NAME(set_element)(ops + 2 * LAYOUT, h, i, NAME(element)(ops + LAYOUT, h, i) * factor);
    }
}

void NAME(gelu_rule)(int64_t threads, int64_t n, const int64_t *ops)
{
    OVER_PAIRS(threads, n, NAME(gelu_range)(p0, p1, ops));
}
#endif /* MANTISSA == 52 */

#undef OVER_PAIRS

#undef VL
#undef SPLAT
#undef SELECT
#undef APPLY
#endif
