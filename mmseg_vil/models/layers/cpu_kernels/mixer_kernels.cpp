// Copyright (c) mmseg-vil contributors. Licensed under the Apache License, Version 2.0.
//
// Fused elementwise stages of the ViL mixer's CPU inference path (see mmseg_vil/models/layers/mixer_ops/reference.py
// for the functions they compute, and cpu_kernels/__init__.py for when they run). No autograd, float32 and float64.
//
// Built for the baseline instruction set of the compiler (plain -O3, auto-vectorised loops), and with GCC on x86-64
// twice more, for AVX2 + FMA and for AVX-512, chosen at run time (MMSEG_VIL_CPU_ISA=baseline|avx2 caps the choice):
// the build runs on any CPU of the architecture.
//
// Callers allocate every output; the ops return nothing (registered without pybind11, which keeps the build short).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace mmseg_vil_cpu {

// Strides of a q/k/v buffer (3, B, NH, steps, DH) with contiguous heads (stride 1 along DH).
struct QkvStrides {
  int64_t projection, batch, head, step;
};

template <typename T>
struct ConvQkvArgs {
  const T* x;             // (B, H * W, E)
  int64_t height, width, inner, kernel, block, head_dim;
  const T* taps;          // (K * K, E): the conv kernel tap-major, rotated by 180 degrees for reverse blocks
  const T* conv_bias;     // (E,), zeros where the conv has none
  const T* padding;       // (E,): the conv's padding in x's terms (-x_bias where x's bias is still to add, else 0)
  const T* qkv_weight_t;  // (3, S, E): [p][i][c] = qkv_weight[p][c / S][c % S][i]
  const T* qkv_bias;      // (3, E), zeros where there are none
  T* x_conv;              // (B, H * W, E)
  T* qkv;                 // (3, B, NH, H * W, DH) with strides
  QkvStrides strides;
  const T* gate_a;        // (G, E): gates = gate_a x_conv + gate_b x + gate_c
  const T* gate_b;        // (G, E)
  const T* gate_c;        // (G,)
  int64_t num_gates;
  T* gates;               // (B, G, H * W)
};

template <typename T>
struct GatedOutputArgs {
  const T* h;  // (B, N, NH, DH), strides h_strides along B, N, NH
  int64_t h_strides[3];
  const T* scale;  // (B, N, NH) with strides scale_strides, or null
  int64_t scale_strides[3];
  int64_t tokens;  // N
  const T* x_conv;  // (B, N, NH * DH)
  T* z;             // (B, N, NH * DH)
  const T* norm_weight;
  const T* norm_bias;  // zeros where the norm has none
  const T* z_bias;     // (NH * DH) added to z first, or null
  const T* skip;
  int64_t heads, head_dim;
  T eps;
};

template <typename T>
struct StateScanArgs {
  const T* summaries;  // (S, J, D)
  const T* decay;      // (S, J)
  const T* weight;     // (S, J)
  T* out;              // (S, J, D), strides out_strides along S, J
  int64_t out_strides[2];
  int64_t chunks, width, tile;
  bool reverse;
};

template <typename T>
struct MaskScoresArgs {
  T* scores;        // (G, L, L + 1)
  const T* scale;   // (G,)
  T* row_sum;       // (G, L)
  int64_t length;
  bool reverse;
};

template <typename T>
struct WeightKeysArgs {
  const T* k;  // (G, L, DH)
  const T* w;  // (G, L)
  T* out;      // (G, L, DH), strides out_strides along G, L
  int64_t out_strides[2];
  T* sums;     // (G, DH)
  int64_t length, head_dim;
};

}  // namespace mmseg_vil_cpu

// The kernels, once per instruction set (mixer_kernels_body.h reads KERNEL_NAMESPACE).
#define KERNEL_NAMESPACE baseline
#include "mixer_kernels_body.h"
#undef KERNEL_NAMESPACE

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC's target pragmas
#define MMSEG_VIL_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define KERNEL_NAMESPACE avx2
#include "mixer_kernels_body.h"
#undef KERNEL_NAMESPACE
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define KERNEL_NAMESPACE avx512
#include "mixer_kernels_body.h"
#undef KERNEL_NAMESPACE
#pragma GCC pop_options
#endif

namespace mmseg_vil_cpu {
namespace {

// The instruction set the kernels run with: 0 baseline, 1 AVX2 + FMA, 2 AVX-512 (F, VL, BW, DQ): the CPU's best,
// capped by MMSEG_VIL_CPU_ISA=baseline|avx2 where set (tests, comparisons; read at each call).
int isa_level() {
#ifdef MMSEG_VIL_HAVE_AVX2
  static const int supported = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return 2;
    return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
  }();
  const char* cap = std::getenv("MMSEG_VIL_CPU_ISA");
  if (cap && std::strcmp(cap, "baseline") == 0) return 0;
  if (cap && std::strcmp(cap, "avx2") == 0) return std::min(supported, 1);
  return supported;
#else
  return 0;
#endif
}

// The kernel function of the instruction set: pick(baseline::f<T>, avx2::f<T>, avx512::f<T>).
template <typename F>
F pick(F baseline_version, F avx2_version, F avx512_version) {
  const int level = isa_level();
  return level == 2 ? avx512_version : level == 1 ? avx2_version : baseline_version;
}

#ifdef MMSEG_VIL_HAVE_AVX2
#define KERNEL_VERSIONS(name) &baseline::name, &avx2::name, &avx512::name
#else
#define KERNEL_VERSIONS(name) &baseline::name, &baseline::name, &baseline::name
#endif

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// Flush-to-zero and denormals-are-zero for the scope (x86-64; elsewhere nothing), the thread's setting restored after.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

std::string instruction_set() {
  const int level = isa_level();
  return level == 2 ? "avx512" : level == 1 ? "avx2" : "baseline";
}

// Grain of the parallel loops in multiply-adds: one thread below about 32k of them.
constexpr int64_t kGrainWork = 1 << 15;

// silu(conv(x) + conv_bias) of tokens x (B, H * W, E) on the grid (H, W) into x_conv (B, H * W, E), the
// block-diagonal q, k (of x_conv) and v (of x) projections plus biases into qkv (3, B, NH, H * W, E / NH), and the
// gate pre-activations gate_weight (G, 3 E) @ [q; k; v] + gate_bias into gates (B, G, H * W), computed as
// A x_conv + B x + c with the gate weights folded into the projections' (reference.fold_gate_weights).
// x_bias: x's bias (E,) not yet added (the up-projection's): x + x_bias is convolved (padded with zeros), projected
// and gated, without a pass that adds it: the zero padding is -x_bias in x's terms, and the bias's share of the conv,
// of v and of the gates goes into their biases.
void conv_qkv(const at::Tensor& x, const std::optional<at::Tensor>& x_bias, int64_t height, int64_t width,
              const at::Tensor& conv_weight,
              const std::optional<at::Tensor>& conv_bias, const at::Tensor& qkv_weight,
              const std::optional<at::Tensor>& qkv_bias, bool reverse, const at::Tensor& gate_weight,
              const at::Tensor& gate_bias, const at::Tensor& x_conv, const at::Tensor& qkv, const at::Tensor& gates) {
  for (const auto* t : {&x, &conv_weight, &qkv_weight, &gate_weight, &gate_bias, &x_conv, &qkv, &gates})
    check_cpu(*t, "every tensor");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.size(1) == height * width, "x: (B, H * W, E) contiguous");
  const int64_t batch = x.size(0), inner = x.size(2);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == inner && conv_weight.size(1) == 1 &&
                  conv_weight.size(2) == conv_weight.size(3) && conv_weight.size(2) % 2 == 1 &&
                  conv_weight.is_contiguous(),
              "conv_weight: (E, 1, K, K) contiguous, K odd");
  TORCH_CHECK(qkv_weight.dim() == 4 && qkv_weight.size(0) == 3 && qkv_weight.size(1) * qkv_weight.size(2) == inner &&
                  qkv_weight.size(2) == qkv_weight.size(3) && qkv_weight.is_contiguous(),
              "qkv_weight: (3, E / S, S, S) contiguous");
  TORCH_CHECK(x_conv.sizes() == x.sizes() && x_conv.is_contiguous(), "x_conv: like x, contiguous");
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(0) == 3 && qkv.size(1) == batch && qkv.size(3) == height * width &&
                  qkv.size(2) * qkv.size(4) == inner && qkv.stride(4) == 1,
              "qkv: (3, B, NH, N, DH), DH contiguous");
  const int64_t block = qkv_weight.size(2), head_dim = qkv.size(4);
  TORCH_CHECK(head_dim % block == 0, "a q/k/v block must not straddle two heads");
  const int64_t num_gates = gate_bias.numel();
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(0) == num_gates && gate_weight.size(1) == 3 * inner &&
                  gate_weight.is_contiguous() && gate_bias.is_contiguous(),
              "gate_weight: (G, 3 E) contiguous, gate_bias: (G,) contiguous");
  TORCH_CHECK(gates.dim() == 3 && gates.size(0) == batch && gates.size(1) == num_gates &&
                  gates.size(2) == height * width && gates.is_contiguous(),
              "gates: (B, G, H * W) contiguous");
  for (const auto* t : {&conv_weight, &qkv_weight, &gate_weight, &gate_bias, &x_conv, &qkv, &gates})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "every tensor in x's dtype");
  if (conv_bias) {
    check_cpu(*conv_bias, "conv_bias");
    TORCH_CHECK(conv_bias->numel() == inner && conv_bias->is_contiguous() &&
                    conv_bias->scalar_type() == x.scalar_type(), "conv_bias: (E,) contiguous");
  }
  if (qkv_bias) {
    check_cpu(*qkv_bias, "qkv_bias");
    TORCH_CHECK(qkv_bias->numel() == 3 * inner && qkv_bias->is_contiguous() &&
                    qkv_bias->scalar_type() == x.scalar_type(), "qkv_bias: (3, E) contiguous");
  }
  if (x_bias) {
    check_cpu(*x_bias, "x_bias");
    TORCH_CHECK(x_bias->numel() == inner && x_bias->is_contiguous() && x_bias->scalar_type() == x.scalar_type(),
                "x_bias: (E,) contiguous");
  }
  const QkvStrides strides{qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3)};
  const int64_t kernel = conv_weight.size(2), taps_count = kernel * kernel;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_qkv", [&] {
    using T = scalar_t;
    const T* cw = conv_weight.data_ptr<T>();
    std::vector<T> taps(taps_count * inner), biases(4 * inner, T(0)), qkv_weight_t(3 * inner * block);
    for (int64_t c = 0; c < inner; ++c)
      for (int64_t tap = 0; tap < taps_count; ++tap)
        taps[tap * inner + c] = cw[c * taps_count + (reverse ? taps_count - 1 - tap : tap)];
    if (conv_bias) std::copy_n(conv_bias->data_ptr<T>(), inner, biases.data());
    if (qkv_bias) std::copy_n(qkv_bias->data_ptr<T>(), 3 * inner, biases.data() + inner);
    const T* qw = qkv_weight.data_ptr<T>();
    for (int64_t p = 0; p < 3; ++p)
      for (int64_t i = 0; i < block; ++i)
        for (int64_t c = 0; c < inner; ++c)
          qkv_weight_t[(p * block + i) * inner + c] = qw[(p * inner + c) * block + i];
    // the gates folded into the projections: gates = A x_conv + B x + c, A from q's and k's blocks, B from v's,
    // c = gate_bias + gate_weight @ qkv_bias
    const T* gw = gate_weight.data_ptr<T>();
    std::vector<T> gate_a(num_gates * inner, T(0)), gate_b(num_gates * inner, T(0)),
        gate_c(gate_bias.data_ptr<T>(), gate_bias.data_ptr<T>() + num_gates);
    for (int64_t g = 0; g < num_gates; ++g)
      for (int64_t p = 0; p < 3; ++p) {
        const T* row = gw + (g * 3 + p) * inner;
        T* folded = (p < 2 ? gate_a.data() : gate_b.data()) + g * inner;
        const T* w = qw + p * inner * block;  // (E / S, S_out, S_in) blocks of projection p
        for (int64_t c0 = 0; c0 < inner; c0 += block)  // the block of channels c0 .. c0 + S - 1
          for (int64_t o = 0; o < block; ++o) {
            const T weight = row[c0 + o];
            const T* w_o = w + (c0 + o) * block;
            for (int64_t i = 0; i < block; ++i) folded[c0 + i] += weight * w_o[i];
          }
        if (qkv_bias) {
          const T* bias = qkv_bias->data_ptr<T>() + p * inner;
          T sum = 0;
          for (int64_t c = 0; c < inner; ++c) sum += row[c] * bias[c];
          gate_c[g] += sum;
        }
      }
    std::vector<T> padding(inner, T(0));
    if (x_bias) {
      const T* xb = x_bias->data_ptr<T>();
      const T* gb = gate_b.data();
      for (int64_t c = 0; c < inner; ++c) {
        padding[c] = -xb[c];
        for (int64_t tap = 0; tap < taps_count; ++tap) biases[c] += taps[tap * inner + c] * xb[c];  // the conv's
        for (int64_t i = 0; i < block; ++i)  // v's
          biases[3 * inner + c] += qkv_weight_t[(2 * block + i) * inner + c] * xb[c - c % block + i];
      }
      for (int64_t g = 0; g < num_gates; ++g)
        for (int64_t c = 0; c < inner; ++c) gate_c[g] += gb[g * inner + c] * xb[c];
    }
    const ConvQkvArgs<T> args{x.data_ptr<T>(), height, width, inner, kernel, block, head_dim, taps.data(),
                              biases.data(), padding.data(), qkv_weight_t.data(), biases.data() + inner,
                              x_conv.data_ptr<T>(), qkv.data_ptr<T>(), strides, gate_a.data(), gate_b.data(),
                              gate_c.data(), num_gates, gates.data_ptr<T>()};
    auto rows = pick(KERNEL_VERSIONS(conv_qkv_rows<T>));
    const int64_t row_work = width * inner * (taps_count + 3 * block + 2 * num_gates);
    at::parallel_for(0, batch * height, std::max<int64_t>(1, kGrainWork / row_work),
                     [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
}

// z = (LayerNorm_per_head(h * h_scale) * norm_weight [+ norm_bias] + skip * x_conv) * silu(z [+ z_bias]) for
// h (B, N, NH, DH) (any strides but along DH), h_scale (B, N, NH, 1) or none (any strides), x_conv, z (B, N, NH * DH)
// contiguous; z_bias: z's bias (NH * DH,) not yet added (the up-projection's).
void gated_output_(const at::Tensor& h, const std::optional<at::Tensor>& h_scale, const at::Tensor& x_conv,
                   const at::Tensor& z, const std::optional<at::Tensor>& z_bias, const at::Tensor& norm_weight,
                   const std::optional<at::Tensor>& norm_bias, const at::Tensor& skip, double eps) {
  for (const auto* t : {&h, &x_conv, &z, &norm_weight, &skip}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->scalar_type() == h.scalar_type(), "every tensor of h's dtype");
  }
  for (const auto* t : {&x_conv, &z, &norm_weight, &skip}) TORCH_CHECK(t->is_contiguous(), "contiguous tensors");
  TORCH_CHECK(h.dim() == 4 && h.stride(3) == 1, "h: (B, N, NH, DH), DH contiguous");
  const int64_t batch = h.size(0), tokens = h.size(1), heads = h.size(2), head_dim = h.size(3);
  const int64_t inner = heads * head_dim;
  TORCH_CHECK(x_conv.numel() == batch * tokens * inner && z.numel() == batch * tokens * inner &&
                  x_conv.size(-1) == inner && z.size(-1) == inner && norm_weight.numel() == inner &&
                  skip.numel() == inner,
              "x_conv, z: (B, N, E); norm_weight, skip: (E,)");
  if (h_scale) {
    check_cpu(*h_scale, "h_scale");
    TORCH_CHECK(h_scale->dim() == 4 && h_scale->size(0) == batch && h_scale->size(1) == tokens &&
                    h_scale->size(2) == heads && h_scale->size(3) == 1 && h_scale->scalar_type() == h.scalar_type(),
                "h_scale: (B, N, NH, 1) of h's dtype");
  }
  for (const auto* bias : {&norm_bias, &z_bias})
    if (*bias) {
      check_cpu(**bias, "biases");
      TORCH_CHECK((*bias)->numel() == inner && (*bias)->is_contiguous() &&
                      (*bias)->scalar_type() == h.scalar_type(), "norm_bias, z_bias: (E,) contiguous");
    }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gated_output_", [&] {
    using T = scalar_t;
    std::vector<T> zeros(norm_bias ? 0 : inner, T(0));
    const GatedOutputArgs<T> args{h.data_ptr<T>(),
                                  {h.stride(0), h.stride(1), h.stride(2)},
                                  h_scale ? h_scale->data_ptr<T>() : nullptr,
                                  {h_scale ? h_scale->stride(0) : 0, h_scale ? h_scale->stride(1) : 0,
                                   h_scale ? h_scale->stride(2) : 0},
                                  tokens,
                                  x_conv.data_ptr<T>(),
                                  z.data_ptr<T>(),
                                  norm_weight.data_ptr<T>(),
                                  norm_bias ? norm_bias->data_ptr<T>() : zeros.data(),
                                  z_bias ? z_bias->data_ptr<T>() : nullptr,
                                  skip.data_ptr<T>(),
                                  heads,
                                  head_dim,
                                  static_cast<T>(eps)};
    auto run = pick(KERNEL_VERSIONS(gated_output_tokens<T>));
    at::parallel_for(0, batch * tokens, std::max<int64_t>(1, kGrainWork / (4 * inner)),
                     [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
}

// The chunkwise cell's states by their recurrence: out[s, j] = decay[s, j] out[s, j - 1] + weight[s, j] summaries[s,
// j - 1], out[s, 0] = 0 (reverse: out[s, J - 1] = 0 and j + 1 for j - 1), for summaries (S, J, D) contiguous, decay
// and weight (S, J) contiguous, out (S, J, D) contiguous along D. Subnormal numbers are flushed to zero meanwhile (on
// x86-64; their arithmetic is many times slower, and the cell drops weights that small anyway).
void state_scan_(const at::Tensor& summaries, const at::Tensor& decay, const at::Tensor& weight, bool reverse,
                 const at::Tensor& out) {
  for (const auto* t : {&summaries, &decay, &weight, &out}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->scalar_type() == summaries.scalar_type(), "every tensor of the summaries' dtype");
  }
  TORCH_CHECK(summaries.dim() == 3 && summaries.is_contiguous(), "summaries: (S, J, D) contiguous");
  const int64_t sequences = summaries.size(0), chunks = summaries.size(1), width = summaries.size(2);
  TORCH_CHECK(decay.dim() == 2 && decay.size(0) == sequences && decay.size(1) == chunks && decay.is_contiguous() &&
                  weight.sizes() == decay.sizes() && weight.is_contiguous(),
              "decay, weight: (S, J) contiguous");
  TORCH_CHECK(out.sizes() == summaries.sizes() && out.stride(2) == 1, "out: (S, J, D), D contiguous");
  if (sequences == 0 || chunks == 0 || width == 0) return;
  AT_DISPATCH_FLOATING_TYPES(summaries.scalar_type(), "state_scan_", [&] {
    using T = scalar_t;
    const int64_t tile = std::min<int64_t>(width, 1024);
    const StateScanArgs<T> args{summaries.data_ptr<T>(), decay.data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(),
                                {out.stride(0), out.stride(1)}, chunks, width, tile, reverse};
    auto run = pick(KERNEL_VERSIONS(state_scan_tiles<T>));
    const int64_t items = sequences * ((width + tile - 1) / tile);
    at::parallel_for(0, items, std::max<int64_t>(1, kGrainWork / (chunks * tile)), [&](int64_t begin, int64_t end) {
      FlushSubnormals flush;
      run(args, begin, end);
    });
  });
}

// The chunkwise cell's scores (G, L, L + 1) (q . n in the last column), contiguous, in place: masked causally
// (anti-causally for reverse), the visible scores times scale (G,); the rows' sums into row_sum (G, L) contiguous.
void mask_scores_(const at::Tensor& scores, const at::Tensor& scale, bool reverse, const at::Tensor& row_sum) {
  for (const auto* t : {&scores, &scale, &row_sum}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == scores.scalar_type(), "contiguous tensors of one dtype");
  }
  TORCH_CHECK(scores.dim() == 3 && scores.size(2) == scores.size(1) + 1, "scores: (G, L, L + 1)");
  const int64_t groups = scores.size(0), length = scores.size(1);
  TORCH_CHECK(scale.numel() == groups && row_sum.numel() == groups * length, "scale: (G,), row_sum: (G, L)");
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mask_scores_", [&] {
    using T = scalar_t;
    const MaskScoresArgs<T> args{scores.data_ptr<T>(), scale.data_ptr<T>(), row_sum.data_ptr<T>(), length, reverse};
    auto run = pick(KERNEL_VERSIONS(mask_scores_groups<T>));
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, length * length)),
                     [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
}

// The chunkwise cell's weighted keys out = k * w (k (G, L, DH) contiguous, w (G, L) contiguous, out (G, L, DH)
// contiguous along DH) and their sums over each chunk, sums (G, DH) contiguous.
void weight_keys_(const at::Tensor& k, const at::Tensor& w, const at::Tensor& out, const at::Tensor& sums) {
  for (const auto* t : {&k, &w, &out, &sums}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->scalar_type() == k.scalar_type(), "tensors of one dtype");
  }
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && w.is_contiguous() && sums.is_contiguous(), "contiguous k, w, sums");
  const int64_t groups = k.size(0), length = k.size(1), head_dim = k.size(2);
  TORCH_CHECK(w.numel() == groups * length && sums.numel() == groups * head_dim && out.sizes() == k.sizes() &&
                  out.stride(2) == 1,
              "w: (G, L), sums: (G, DH), out: (G, L, DH) contiguous along DH");
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "weight_keys_", [&] {
    using T = scalar_t;
    const WeightKeysArgs<T> args{k.data_ptr<T>(), w.data_ptr<T>(), out.data_ptr<T>(), {out.stride(0), out.stride(1)},
                                 sums.data_ptr<T>(), length, head_dim};
    auto run = pick(KERNEL_VERSIONS(weight_keys_groups<T>));
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, length * head_dim)),
                     [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
}

}  // namespace
}  // namespace mmseg_vil_cpu

TORCH_LIBRARY(mmseg_vil_cpu, m) {
  m.def("instruction_set() -> str", &mmseg_vil_cpu::instruction_set);
  m.def(
      "conv_qkv(Tensor x, Tensor? x_bias, int height, int width, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor qkv_weight, Tensor? qkv_bias, bool reverse, Tensor gate_weight, Tensor gate_bias, Tensor(a!) x_conv, "
      "Tensor(b!) qkv, Tensor(c!) gates) -> ()",
      &mmseg_vil_cpu::conv_qkv);
  m.def("mask_scores_(Tensor(a!) scores, Tensor scale, bool reverse, Tensor(b!) row_sum) -> ()",
        &mmseg_vil_cpu::mask_scores_);
  m.def("weight_keys_(Tensor k, Tensor w, Tensor(a!) out, Tensor(b!) sums) -> ()", &mmseg_vil_cpu::weight_keys_);
  m.def("state_scan_(Tensor summaries, Tensor decay, Tensor weight, bool reverse, Tensor(a!) out) -> ()",
        &mmseg_vil_cpu::state_scan_);
  m.def(
      "gated_output_(Tensor h, Tensor? h_scale, Tensor x_conv, Tensor(a!) z, Tensor? z_bias, Tensor norm_weight, "
      "Tensor? norm_bias, Tensor skip, float eps) -> ()",
      &mmseg_vil_cpu::gated_output_);
}
