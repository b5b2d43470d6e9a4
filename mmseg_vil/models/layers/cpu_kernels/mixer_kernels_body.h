// Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
//
// The loops of mixer_kernels.cpp, included once per instruction set inside namespace KERNEL_NAMESPACE (no include
// guard on purpose). Plain loops over contiguous channels that the compiler vectorises; the exponential is written
// out (range reduction and a polynomial, no library call) so that SiLU vectorises too.
//
// Rounding: sums are taken in another order than the PyTorch reference's (and contracted to fused multiply-adds
// where the instruction set has them), so results differ from it in the last bits.

namespace mmseg_vil_cpu {
namespace KERNEL_NAMESPACE {

// exp(y) for y <= 0, float / double within a few ulp: y = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial,
// 2^n as two factors 2^n1 2^n2 (n1 + n2 = n, each a normal number) put into the exponent bits, so that the product
// underflows as exp does. Arguments below lo (exp_arg clamps them there) give exp(lo) = 0 (below the smallest
// subnormal).
template <typename T>
struct Exp;

template <>
struct Exp<float> {
  using Int = int32_t;
  static constexpr float lo = -170.0f, hi = 100.0f, log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // ln2_hi * n exact for |n| < 2^15
  static constexpr float magic = 12582912.0f;                              // 1.5 * 2^23: t + magic rounds t
  static constexpr int mantissa = 23;
  static constexpr Int exponent_bias = 127;
  static inline float poly(float r) {  // degree 7: remainder below 6e-9 relative at |r| = ln2 / 2
    return 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f +
           r * (8.33333333e-3f + r * (1.38888889e-3f + r * 1.98412698e-4f))))));
  }
};

template <>
struct Exp<double> {
  using Int = int64_t;
  static constexpr double lo = -1400.0, hi = 720.0, log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93145751953125e-1, ln2_lo = 1.42860682030941723212e-6;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mantissa = 52;
  static constexpr Int exponent_bias = 1023;
  static inline double poly(double r) {  // degree 13: remainder below 6e-18 relative at |r| = ln2 / 2
    return 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (1.0 / 720 +
           r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (1.0 / 3628800 + r * (1.0 / 39916800 +
           r * (1.0 / 479001600 + r * (1.0 / 6227020800.0)))))))))))));
  }
};

// 2^m for the integer m held by t = magic + m (|m| below the exponent bias).
template <typename T>
inline T power_of_two(T t) {
  using E = Exp<T>;
  typename E::Int t_bits, magic_bits;
  const T magic = E::magic;
  std::memcpy(&t_bits, &t, sizeof(T));
  std::memcpy(&magic_bits, &magic, sizeof(T));
  const typename E::Int bits = (t_bits - magic_bits + E::exponent_bias) << E::mantissa;
  T power;
  std::memcpy(&power, &bits, sizeof(T));
  return power;
}

// exp(y) for y in [lo, 0] (exp_arg), or in [lo, hi] (exp_clamped).
template <typename T>
inline T exp_nonpositive(T y) {
  using E = Exp<T>;
  const T t = y * E::log2e + E::magic;  // magic + n: n = round(y / ln 2)
  const T n = t - E::magic;
  const T t1 = n * T(0.5) + E::magic;  // magic + n1, n1 = round(n / 2)
  const T t2 = (n - (t1 - E::magic)) + E::magic;
  const T r = (y - n * E::ln2_hi) - n * E::ln2_lo;
  return (E::poly(r) * power_of_two(t1)) * power_of_two(t2);
}

// exp(y) for any y (NaN stays NaN): y clamped to [lo, hi] (exp(hi) overflows to inf), then as exp_nonpositive, whose
// reduction also holds for positive arguments (2^n1 and 2^n2 stay normal numbers up to n = 2 hi / ln 2).
template <typename T>
inline T exp_clamped(T y) {
  const T hi = Exp<T>::hi;
  return exp_nonpositive(y < Exp<T>::lo ? Exp<T>::lo : y > hi ? hi : y);
}

// -|x| clamped to [lo, 0] (NaN stays NaN).
template <typename T>
inline T exp_arg(T x) {
  const T y = -std::fabs(x);
  return y < Exp<T>::lo ? Exp<T>::lo : y;
}

// out[i] = silu(x) = x sigmoid(x) for x = in[i] (out may be in), with e = exp(-|x|) <= 1: sigmoid(x) = 1 / (1 + e)
// for x >= 0, e / (1 + e) below. So silu is -0 rather than NaN or -x * 1e-38 for large negative x; silu(-inf) is
// NaN as in torch. The clamp and the rest are two loops over chunks: in one loop the compiler splits the clamp's
// constant case into a branch and then vectorises nothing.
template <typename T>
inline void silu_row(const T* in, T* out, int64_t n) {
  constexpr int64_t kChunk = 64;
  T arg[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    for (int64_t i = 0; i < len; ++i) arg[i] = exp_arg(in[start + i]);
    for (int64_t i = 0; i < len; ++i) {  // (written so: GCC leaves other forms of the select as a branch)
      const T x = in[start + i], e = exp_nonpositive(arg[i]);
      out[start + i] = x * ((x >= T(0) ? T(1) : e) / (T(1) + e));
    }
  }
}

// out[c] = sum over the taps of w[tap][c] * src[tap][c], plus bias[c]: for a 3 x 3 kernel one unrolled sum per
// channel (the sum stays in a register), for other kernels tap by tap.
template <typename T>
inline void conv_taps(const T* const* src, const T* taps, const T* bias, int64_t count, int64_t E,
                      T* __restrict out) {
  if (count == 9) {
    const T *s0 = src[0], *s1 = src[1], *s2 = src[2], *s3 = src[3], *s4 = src[4], *s5 = src[5], *s6 = src[6],
            *s7 = src[7], *s8 = src[8];
    const T *w0 = taps, *w1 = taps + E, *w2 = taps + 2 * E, *w3 = taps + 3 * E, *w4 = taps + 4 * E,
            *w5 = taps + 5 * E, *w6 = taps + 6 * E, *w7 = taps + 7 * E, *w8 = taps + 8 * E;
    for (int64_t c = 0; c < E; ++c) {  // three independent chains of multiply-adds, one per kernel row
      const T top = w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c];
      const T middle = w3[c] * s3[c] + w4[c] * s4[c] + w5[c] * s5[c];
      const T bottom = w6[c] * s6[c] + w7[c] * s7[c] + w8[c] * s8[c];
      out[c] = bias[c] + (top + middle + bottom);
    }
    return;
  }
  for (int64_t c = 0; c < E; ++c) out[c] = bias[c];
  for (int64_t tap = 0; tap < count; ++tap) {
    const T* w = taps + tap * E;
    const T* x = src[tap];
    for (int64_t c = 0; c < E; ++c) out[c] += w[c] * x[c];
  }
}

// The block-diagonal product of one head's channels [c0, c0 + n): out[o] = sum_i w[i][c0 + o] * in[c0 + o - o % S + i]
// + bias[c0 + o], with w the blocks i-major (S, E), so that each sum is S multiply-adds of contiguous weights.
template <typename T>
inline void block_products(const T* in, const T* w, const T* bias, int64_t S, int64_t E, int64_t c0, int64_t n,
                           T* __restrict out) {
  if (S == 4) {
    const T *w0 = w + c0, *w1 = w + E + c0, *w2 = w + 2 * E + c0, *w3 = w + 3 * E + c0, *x = in + c0, *b = bias + c0;
    for (int64_t c = 0; c < n; c += 4) {
      const T x0 = x[c], x1 = x[c + 1], x2 = x[c + 2], x3 = x[c + 3];
      for (int64_t o = 0; o < 4; ++o)
        out[c + o] = (w0[c + o] * x0 + w1[c + o] * x1 + w2[c + o] * x2 + w3[c + o] * x3) + b[c + o];
    }
    return;
  }
  for (int64_t c = 0; c < n; c += S)
    for (int64_t o = 0; o < S; ++o) {
      T sum = 0;
      for (int64_t i = 0; i < S; ++i) sum += w[i * E + c0 + c + o] * in[c0 + c + i];
      out[c + o] = sum + bias[c0 + c + o];
    }
}

// Gate pre-activations of one token, out[g * out_stride] = c[g] + A[g] . xc + B[g] . x for g < G (A, B (G, E)):
// four gates at a time, the x_conv and x halves in separate sums (eight independent chains of multiply-adds).
template <typename T>
inline void gate_dots(const T* xc, const T* x, const T* A, const T* B, const T* bias, int64_t G, int64_t E,
                      int64_t out_stride, T* out) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    const T *a0 = A + g * E, *a1 = a0 + E, *a2 = a1 + E, *a3 = a2 + E;
    const T *b0 = B + g * E, *b1 = b0 + E, *b2 = b1 + E, *b3 = b2 + E;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0, t0 = 0, t1 = 0, t2 = 0, t3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, t0, t1, t2, t3)
    for (int64_t c = 0; c < E; ++c) {
      s0 += a0[c] * xc[c];
      s1 += a1[c] * xc[c];
      s2 += a2[c] * xc[c];
      s3 += a3[c] * xc[c];
      t0 += b0[c] * x[c];
      t1 += b1[c] * x[c];
      t2 += b2[c] * x[c];
      t3 += b3[c] * x[c];
    }
    out[g * out_stride] = bias[g] + s0 + t0;
    out[(g + 1) * out_stride] = bias[g + 1] + s1 + t1;
    out[(g + 2) * out_stride] = bias[g + 2] + s2 + t2;
    out[(g + 3) * out_stride] = bias[g + 3] + s3 + t3;
  }
  for (; g < G; ++g) {
    const T *ag = A + g * E, *bg = B + g * E;
    T s = 0, t = 0;
#pragma omp simd reduction(+ : s, t)
    for (int64_t c = 0; c < E; ++c) {
      s += ag[c] * xc[c];
      t += bg[c] * x[c];
    }
    out[g * out_stride] = bias[g] + s + t;
  }
}

// Prefetches the `bytes` from `address` (their cache lines) into L2.
inline void prefetch_range(const void* address, int64_t bytes, bool write) {
  const char* start = static_cast<const char*>(address);
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    if (write)
      MMSEG_VIL_PREFETCH(start + offset, 1);
    else
      MMSEG_VIL_PREFETCH(start + offset, 0);
  }
}

// Rows [row_begin, row_end) of the (B * H) image rows: conv + bias + SiLU into x_conv, q/k/v into their head layout,
// the gate pre-activations into gates (B, G, H * W).
template <typename T>
void conv_qkv_rows(const ConvQkvArgs<T>& a, int64_t row_begin, int64_t row_end) {
  const int64_t E = a.inner, K = a.kernel, pad = K / 2, W = a.width, H = a.height, S = a.block;
  const int64_t heads = E / a.head_dim;
  std::vector<T> buffer(E);  // the conv's output
  T* acc = buffer.data();
  const T* padding = a.padding;
  std::vector<const T*> src(K * K);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / H, y = row % H;
    // one stage at a time over the row's tokens, so that each stage's weights stay in the L1 cache (all three
    // stages' weights exceed it: 1024 tokens 1.12 -> 0.91 ms, 4096 3.7 -> 3.3 ms)
    const int64_t first = b * H * W + y * W;  // the row's first token
    const int64_t ahead = y + pad + 1;  // the image row that the next row's conv reads first
    for (int64_t xx = 0; xx < W; ++xx) {
      if (ahead < H) prefetch_range(a.x + ((b * H + ahead) * W + xx) * a.x_stride, E * sizeof(T), false);
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t yy = y + i - pad, xj = xx + j - pad;
          src[i * K + j] =
              (yy < 0 || yy >= H || xj < 0 || xj >= W) ? padding : a.x + ((b * H + yy) * W + xj) * a.x_stride;
        }
      conv_taps(src.data(), a.taps, a.conv_bias, K * K, E, acc);
      silu_row(acc, a.x_conv + (first + xx) * E, E);
    }
    // q, k of x_conv and v of x: per head, its blocks' products written into the head's row of the layout
    for (int64_t p = 0; p < 3; ++p)
      for (int64_t xx = 0; xx < W; ++xx) {
        const T* in = p < 2 ? a.x_conv + (first + xx) * E : a.x + (first + xx) * a.x_stride;
        for (int64_t h = 0; h < heads; ++h)
          block_products(in, a.qkv_weight_t + p * S * E, a.qkv_bias + p * E, S, E, h * a.head_dim, a.head_dim,
                         a.qkv + p * a.strides.projection + b * a.strides.batch + h * a.strides.head +
                             (y * W + xx) * a.strides.step);
      }
    for (int64_t xx = 0; xx < W; ++xx)
      gate_dots(a.x_conv + (first + xx) * E, a.x + (first + xx) * a.x_stride, a.gate_a, a.gate_b, a.gate_c,
                a.num_gates, E, H * W, a.gates + b * a.num_gates * H * W + y * W + xx);
  }
}

// The mean of v's n values and 1 / sqrt(their variance + eps), in two passes over v (in cache).
template <typename T>
inline void row_moments(const T* v, int64_t n, T eps, T* mean, T* rstd) {
  const T inv_n = T(1) / T(n);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += v[i];
  const T m = sum * inv_n;  // a local: the loop below cannot alias it
  T squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += (v[i] - m) * (v[i] - m);
  *mean = m;
  *rstd = T(1) / std::sqrt(squares * inv_n + eps);
}

// Head hd's channels of one token (xc, z: the token's rows of x_conv and z): z = (LayerNorm(h) * w + b + skip *
// x_conv) * silu(z [+ z_bias]) for the head's row h (DH).
template <typename T>
inline void gate_head(const GatedOutputArgs<T>& a, const T* hv, int64_t hd, const T* xc, T* z) {
  const int64_t DH = a.head_dim, c0 = hd * DH;
  if (a.z_bias)
    for (int64_t d = 0; d < DH; ++d) z[c0 + d] += a.z_bias[c0 + d];
  silu_row(z + c0, z + c0, DH);
  T mean, rstd;
  row_moments(hv, DH, a.eps, &mean, &rstd);
  for (int64_t d = 0; d < DH; ++d) {
    const int64_t c = c0 + d;
    const T normed = a.norm_bias[c] + ((hv[d] - mean) * rstd) * a.norm_weight[c];
    z[c] *= normed + a.skip[c] * xc[c];
  }
}

// Tokens [begin, end) of the B * N: z = (LayerNorm_per_head(h) * w + b + skip * x_conv) * silu(z), with h's rows
// times their scale first where there is one, z plus its bias first where there is one.
template <typename T>
void gated_output_tokens(const GatedOutputArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t DH = a.head_dim, E = a.heads * DH;
  std::vector<T> scaled(a.scale ? DH : 0);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / a.tokens, n = t % a.tokens;
    for (int64_t hd = 0; hd < a.heads; ++hd) {
      const T* hv = a.h + b * a.h_strides[0] + n * a.h_strides[1] + hd * a.h_strides[2];
      if (a.scale) {
        const T factor = a.scale[b * a.scale_strides[0] + n * a.scale_strides[1] + hd * a.scale_strides[2]];
        for (int64_t d = 0; d < DH; ++d) scaled[d] = hv[d] * factor;
        hv = scaled.data();
      }
      gate_head(a, hv, hd, a.x_conv + t * E, a.z + t * a.z_stride);
    }
  }
}

// Rows [begin, end) of the residual stream (AddNormArgs): the sum in place, then its LayerNorm.
template <typename T>
void add_layer_norm_rows(const AddNormArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t D = a.dim;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = a.x + r * D;
    T* __restrict u = a.update + r * D;
    T* __restrict y = a.normed + r * D;
    if (a.update_bias)
      for (int64_t d = 0; d < D; ++d) u[d] = (u[d] + a.update_bias[d]) + x[d];
    else
      for (int64_t d = 0; d < D; ++d) u[d] += x[d];
    T mean, rstd;
    row_moments(u, D, a.eps, &mean, &rstd);
    for (int64_t d = 0; d < D; ++d) y[d] = (u[d] - mean) * rstd * a.weight[d] + a.bias[d];
  }
}

// The gates of the chunk from step p0, its steps taken in the cell's direction: running sums of the log forget gates
// (cum_f), the keys' log-weights key_log = i - cum_f (padding: -inf) and their running max; the keys' max and the
// chunk's total log forget gate into key_max and chunk_log_f.
template <typename T>
inline void chunk_gates(const CellArgs<T>& a, const T* igate, const T* log_f, int64_t p0, T* cum_f, T* key_log,
                        T* running_max, T* key_max, T* chunk_log_f) {
  const int64_t L = a.length;
  T cum = 0, running = -std::numeric_limits<T>::infinity();
  for (int64_t u = 0; u < L; ++u) {
    const int64_t t = a.reverse ? L - 1 - u : u, r = p0 + t - (a.reverse ? a.pad : 0);  // r: the real step
    const bool real = r >= 0 && r < a.n;
    cum += real ? log_f[r] : T(0);
    cum_f[t] = cum;
    key_log[t] = (real ? igate[r] : -std::numeric_limits<T>::infinity()) - cum;
    running = key_log[t] > running ? key_log[t] : running;
    running_max[t] = running;
  }
  *key_max = running;
  *chunk_log_f = cum;
}

// Sequences [begin, end) of the B * NH: whether every chunk's keys span at most row_range + key_lead (the cell's
// ranges, mlstm/chunkwise_inference.py); *a.too_wide set where not.
template <typename T>
void cell_keys_fit(const CellArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t L = a.length, J = a.steps / L;
  std::vector<T> buffer(3 * L);
  for (int64_t s = begin; s < end && !a.too_wide->load(std::memory_order_relaxed); ++s) {
    const int64_t b = s / a.heads, head = s % a.heads;
    const T* igate = a.igate + b * a.igate_strides[0] + head * a.igate_strides[1];
    const T* log_f = a.log_f + b * a.log_f_strides[0] + head * a.log_f_strides[1];
    for (int64_t j = 0; j < J; ++j) {
      T key_max, chunk_log_f;
      chunk_gates(a, igate, log_f, j * L, buffer.data(), buffer.data() + L, buffer.data() + 2 * L, &key_max,
                  &chunk_log_f);
      const T first_key = buffer[L + (a.reverse ? L - 1 : 0)];
      if (key_max - std::min(key_max, first_key + a.row_range) > a.key_lead) {
        a.too_wide->store(true, std::memory_order_relaxed);
        return;
      }
    }
  }
}

// Sequences [begin, end) of the B * NH (their keys checked by cell_keys_fit): the factorised chunkwise cell (mlstm/chunkwise_inference.py) chunk by chunk
// in the cell's direction, the state (DH x DH) and its normaliser (DH) carried from chunk to chunk by their
// recurrence, so that no chunk's state or summary is stored. Per chunk: the weighted keys and their sum, the scores of
// the visible blocks of `a.block` rows, q S + scores v, and h with its rows' normalisers into out, or its gated output
// into a.gated's z (BLAS's products on data in cache).
template <typename T>
void cell_sequences(const CellArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t L = a.length, D = a.head_dim, J = a.steps / L;
  std::vector<T> buffer(2 * D * L + L * L + L * D + D * D + 4 * D + 7 * L);
  T *keys = buffer.data(), *previous_keys = keys + D * L, *scores = previous_keys + D * L;
  T *mixed = scores + L * L, *state = mixed + L * D, *norm = state + D * D, *key_sums = norm + D;
  T *previous_key_sums = key_sums + D, *cum_f = previous_key_sums + D, *key_log = cum_f + L;
  T *running_max = key_log + L, *weight = running_max + L, *row_sum = weight + L, *qn = row_sum + L;
  T *factor = qn + L, *h_row = factor + L;
  const T tiny = std::sqrt(std::numeric_limits<T>::min());  // chunkwise._flush_tiny's threshold
  for (int64_t s = begin; s < end; ++s) {
    const int64_t b = s / a.heads, head = s % a.heads;
    const T* igate = a.igate + b * a.igate_strides[0] + head * a.igate_strides[1];
    const T* log_f = a.log_f + b * a.log_f_strides[0] + head * a.log_f_strides[1];
    const T *q_seq = a.q + s * a.steps * D, *k_seq = a.k + s * a.steps * D, *v_seq = a.v + s * a.steps * D;
    T* out = a.out ? a.out + b * a.out_strides[0] + head * a.out_strides[1] : nullptr;
    // the state's log-weight stabiliser (its summaries' largest key weight, decayed), and the previous chunk's terms
    T state_max = T(-1e30), previous_ref = 0, previous_key_ref = 0, previous_key_max = 0, previous_log_f = 0;
    const T* previous_v = nullptr;
    for (int64_t c = 0; c < J; ++c) {
      const int64_t p0 = (a.reverse ? J - 1 - c : c) * L;
      const T *q = q_seq + p0 * D, *k = k_seq + p0 * D, *v = v_seq + p0 * D;
      // the next chunk's first step: its rows of q, k, v and of the gated output's x_conv and z are fetched into L2
      // row by row while this chunk's loops run (at 4096 steps the cell waited on them: 11.9 -> 9.6-10.2 ms)
      const int64_t next = c + 1 < J ? (a.reverse ? J - 2 - c : c + 1) * L : -1;
      T key_max, chunk_log_f;
      chunk_gates(a, igate, log_f, p0, cum_f, key_log, running_max, &key_max, &chunk_log_f);
      const T key_ref = std::min(key_max, key_log[a.reverse ? L - 1 : 0] + a.row_range);
      const T ref = std::max(key_ref, state_max - a.state_lead);
      if (c > 0) {  // the state read by this chunk: the last one's decayed, plus the last chunk's summary
        const T log_decay = previous_log_f + previous_ref - ref;
        const T decay = c == 1 || log_decay < a.log_flush - a.state_lead ? T(0) : exp_clamped(log_decay);
        const T weight_of_last = previous_log_f + previous_key_max - ref < a.log_flush
                                     ? T(0) : exp_clamped(previous_log_f + previous_key_ref - ref);
        a.gemm(true, false, D, D, L, weight_of_last, previous_keys, D, previous_v, D, decay, state, D);
        for (int64_t d = 0; d < D; ++d)
          norm[d] = (decay == T(0) ? T(0) : decay * norm[d]) + weight_of_last * previous_key_sums[d];
      }
      // the keys times their weights relative to key_ref (with 1 / sqrt(DH)), and their sum
      for (int64_t t = 0; t < L; ++t) weight[t] = exp_clamped(key_log[t] - key_ref + a.log_scale);
      for (int64_t t = 0; t < L; ++t) weight[t] = weight[t] < tiny ? T(0) : weight[t];
      for (int64_t d = 0; d < D; ++d) key_sums[d] = T(0);
      for (int64_t t = 0; t < L; ++t) {
        if (next >= 0)
          for (const T* x : {q_seq, k_seq, v_seq}) prefetch_range(x + (next + t) * D, D * sizeof(T), false);
        const T* key = k + t * D;
        T* __restrict row = keys + t * D;
        for (int64_t d = 0; d < D; ++d) {
          row[d] = key[d] * weight[t];
          key_sums[d] += row[d];
        }
      }
      // scores of the visible blocks, times the chunk's scale (its keys' reference relative to ref), masked inside
      // the diagonal blocks; each row's sum plus q . n is its normaliser
      const T scale = exp_clamped(key_ref - ref);
      for (int64_t r0 = 0; r0 < L; r0 += a.block) {
        const int64_t r1 = std::min(L, r0 + a.block), c0 = a.reverse ? r0 : 0, c1 = a.reverse ? L : r1;
        a.gemm(false, true, r1 - r0, c1 - c0, D, scale, q + r0 * D, D, keys + c0 * D, D, T(0), scores + r0 * L + c0,
               L);
        for (int64_t t = r0; t < r1; ++t) {
          T* row = scores + t * L;
          const int64_t lo = a.reverse ? t : c0, hi = a.reverse ? c1 : t + 1;  // visible keys
          for (int64_t u = c0; u < lo; ++u) row[u] = T(0);
          for (int64_t u = hi; u < c1; ++u) row[u] = T(0);
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t u = lo; u < hi; ++u) sum += row[u];
          row_sum[t] = sum;
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        T dot = 0;
        if (c > 0) {
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += q[t * D + d] * norm[d];
        }
        qn[t] = dot;
      }
      // mixed = q S + scores v over the visible blocks
      if (c > 0) a.gemm(false, false, L, D, D, T(1), q, D, state, D, T(0), mixed, D);
      for (int64_t r0 = 0; r0 < L; r0 += a.block) {
        const int64_t r1 = std::min(L, r0 + a.block), c0 = a.reverse ? r0 : 0, c1 = a.reverse ? L : r1;
        a.gemm(false, false, r1 - r0, D, c1 - c0, T(1), scores + r0 * L + c0, L, v + c0 * D, D, c > 0 ? T(1) : T(0),
               mixed + r0 * D, D);
      }
      // h = mixed / (max(|row sum + q . n|, exp(-(cum_f + ref))) + eps exp(stabiliser - ref)) for the real steps
      for (int64_t t = 0; t < L; ++t) {
        const T stabiliser = running_max[t] > state_max ? running_max[t] : state_max;
        const T x = row_sum[t] + qn[t], floor = exp_clamped(-(cum_f[t] + ref));
        factor[t] = T(1) / ((std::fabs(x) > floor ? std::fabs(x) : floor) + exp_clamped(stabiliser - ref) * a.eps);
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t r = p0 + t - (a.reverse ? a.pad : 0), r_next = next + t - (a.reverse ? a.pad : 0);
        if (a.gated && next >= 0 && r_next >= 0 && r_next < a.n) {
          const int64_t token = b * a.n + r_next;
          prefetch_range(a.gated->x_conv + token * a.heads * D + head * D, D * sizeof(T), false);
          prefetch_range(a.gated->z + token * a.gated->z_stride + head * D, D * sizeof(T), true);
        }
        if (r < 0 || r >= a.n) continue;
        const T* x = mixed + t * D;
        if (a.gated) {  // the gated output of the head's channels, from h in cache
          for (int64_t d = 0; d < D; ++d) h_row[d] = x[d] * factor[t];
          const int64_t token = b * a.n + r, E = a.heads * D;
          gate_head(*a.gated, h_row, head, a.gated->x_conv + token * E, a.gated->z + token * a.gated->z_stride);
        } else {
          T* h = out + r * a.out_strides[2];
          for (int64_t d = 0; d < D; ++d) h[d] = x[d] * factor[t];
        }
      }
      std::swap(keys, previous_keys);
      std::swap(key_sums, previous_key_sums);
      previous_v = v;
      previous_ref = ref;
      previous_key_ref = key_ref;
      previous_key_max = key_max;
      previous_log_f = chunk_log_f;
      state_max = std::max(state_max, key_max) + chunk_log_f;
    }
  }
}

}  // namespace KERNEL_NAMESPACE
}  // namespace mmseg_vil_cpu
