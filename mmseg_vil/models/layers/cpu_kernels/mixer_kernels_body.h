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
  static constexpr float lo = -170.0f, log2e = 1.44269504088896341f;
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
  static constexpr double lo = -1400.0, log2e = 1.4426950408889634074;
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

// exp(y) for y in [lo, 0] (exp_arg).
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
    for (int64_t c = 0; c < E; ++c)
      out[c] = bias[c] + w0[c] * s0[c] + w1[c] * s1[c] + w2[c] * s2[c] + w3[c] * s3[c] + w4[c] * s4[c] +
               w5[c] * s5[c] + w6[c] * s6[c] + w7[c] * s7[c] + w8[c] * s8[c];
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
    for (int64_t xx = 0; xx < W; ++xx) {
      const int64_t step = y * W + xx, token = b * H * W + step;
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) {
          const int64_t yy = y + i - pad, xj = xx + j - pad;
          src[i * K + j] = (yy < 0 || yy >= H || xj < 0 || xj >= W) ? padding : a.x + ((b * H + yy) * W + xj) * E;
        }
      conv_taps(src.data(), a.taps, a.conv_bias, K * K, E, acc);
      T* xc = a.x_conv + token * E;
      silu_row(acc, xc, E);
      // q, k of x_conv and v of x: per head, its blocks' products written into the head's row of the layout
      for (int64_t p = 0; p < 3; ++p) {
        const T* in = p < 2 ? xc : a.x + token * E;
        for (int64_t h = 0; h < heads; ++h)
          block_products(in, a.qkv_weight_t + p * S * E, a.qkv_bias + p * E, S, E, h * a.head_dim, a.head_dim,
                         a.qkv + p * a.strides.projection + b * a.strides.batch + h * a.strides.head +
                             step * a.strides.step);
      }
      gate_dots(xc, a.x + token * E, a.gate_a, a.gate_b, a.gate_c, a.num_gates, E, H * W,
                a.gates + b * a.num_gates * H * W + step);
    }
  }
}

// Tokens [begin, end) of the B * N: z = (LayerNorm_per_head(h) * w + b + skip * x_conv) * silu(z), with h's rows
// times their scale first where there is one, z plus its bias first where there is one.
template <typename T>
void gated_output_tokens(const GatedOutputArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t DH = a.head_dim, E = a.heads * DH;
  const T inv_dh = T(1) / T(DH);
  std::vector<T> scaled(a.scale ? DH : 0);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / a.tokens, n = t % a.tokens;
    const T* xc = a.x_conv + t * E;
    T* z = a.z + t * E;
    if (a.z_bias)
      for (int64_t c = 0; c < E; ++c) z[c] += a.z_bias[c];
    silu_row(z, z, E);
    for (int64_t hd = 0; hd < a.heads; ++hd) {
      const T* hv = a.h + b * a.h_strides[0] + n * a.h_strides[1] + hd * a.h_strides[2];
      if (a.scale) {
        const T factor = a.scale[b * a.scale_strides[0] + n * a.scale_strides[1] + hd * a.scale_strides[2]];
        for (int64_t d = 0; d < DH; ++d) scaled[d] = hv[d] * factor;
        hv = scaled.data();
      }
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < DH; ++d) sum += hv[d];
      const T mean = sum * inv_dh;
      T squares = 0;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < DH; ++d) squares += (hv[d] - mean) * (hv[d] - mean);
      const T rstd = T(1) / std::sqrt(squares * inv_dh + a.eps);
      const int64_t c0 = hd * DH;
      for (int64_t d = 0; d < DH; ++d) {
        const int64_t c = c0 + d;
        const T normed = a.norm_bias[c] + ((hv[d] - mean) * rstd) * a.norm_weight[c];
        z[c] *= normed + a.skip[c] * xc[c];
      }
    }
  }
}

// Work items [begin, end) of sequences x column tiles: the chunk states' recurrence out[j] = decay[j] out[j - 1] +
// weight[j] summaries[j - 1] from out[0] = 0 (reverse: from the last chunk, j + 1 for j - 1).
template <typename T>
void state_scan_tiles(const StateScanArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t J = a.chunks, D = a.width, tiles = (D + a.tile - 1) / a.tile;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t s = item / tiles, c0 = (item % tiles) * a.tile, len = std::min(a.tile, D - c0);
    const T* decay = a.decay + s * J;
    const T* weight = a.weight + s * J;
    const int64_t first = a.reverse ? J - 1 : 0, step = a.reverse ? -1 : 1;
    T* out = a.out + s * a.out_strides[0] + c0;
    T* zero = out + first * a.out_strides[1];
    for (int64_t c = 0; c < len; ++c) zero[c] = T(0);
    for (int64_t k = 1; k < J; ++k) {
      const int64_t j = first + k * step, previous = j - step;
      T* __restrict dst = out + j * a.out_strides[1];
      const T* last = out + previous * a.out_strides[1];
      const T* summary = a.summaries + (s * J + previous) * D + c0;
      const T d = decay[j], w = weight[j];
      for (int64_t c = 0; c < len; ++c) dst[c] = d * last[c] + w * summary[c];
    }
  }
}

// Groups [begin, end) of the chunkwise cell's scores (G, L, L + 1), q . n in the last column: each chunk's scores
// masked causally (anti-causally for reverse) and times the chunk's scale, the rows' sums (the q . n column
// included) into row_sum (G, L).
template <typename T>
void mask_scores_groups(const MaskScoresArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t L = a.length, width = L + 1;
  for (int64_t g = begin; g < end; ++g) {
    const T scale = a.scale[g];
    for (int64_t t = 0; t < L; ++t) {
      T* row = a.scores + (g * L + t) * width;
      // visible keys: s <= t (causal) or s >= t (reverse)
      const int64_t lo = a.reverse ? t : 0, hi = a.reverse ? L : t + 1;
      for (int64_t s = 0; s < lo; ++s) row[s] = T(0);
      for (int64_t s = hi; s < L; ++s) row[s] = T(0);
      T sum = 0;
      if (scale != T(1)) {  // (mostly 1: the visible scores are then only read)
#pragma omp simd reduction(+ : sum)
        for (int64_t s = lo; s < hi; ++s) {
          row[s] *= scale;
          sum += row[s];
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t s = lo; s < hi; ++s) sum += row[s];
      }
      a.row_sum[g * L + t] = sum + row[L];
    }
  }
}

// Groups [begin, end) of the chunkwise cell's keys: out[g, t] = k[g, t] * w[g, t] and sums[g] = sum_t out[g, t]
// (the chunk's normaliser summary).
template <typename T>
void weight_keys_groups(const WeightKeysArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t L = a.length, D = a.head_dim;
  for (int64_t g = begin; g < end; ++g) {
    T* __restrict sums = a.sums + g * D;
    for (int64_t d = 0; d < D; ++d) sums[d] = T(0);
    for (int64_t t = 0; t < L; ++t) {
      const T* key = a.k + (g * L + t) * D;
      T* __restrict out = a.out + g * a.out_strides[0] + t * a.out_strides[1];
      const T w = a.w[g * L + t];
      for (int64_t d = 0; d < D; ++d) {
        out[d] = key[d] * w;
        sums[d] += out[d];
      }
    }
  }
}

}  // namespace KERNEL_NAMESPACE
}  // namespace mmseg_vil_cpu
