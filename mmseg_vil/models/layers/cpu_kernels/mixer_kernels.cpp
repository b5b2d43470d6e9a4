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
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
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
  const T* x;             // (B, H * W, E), rows x_stride apart
  int64_t x_stride;
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
  T* z;             // (B, N, NH * DH), rows z_stride apart
  int64_t z_stride;
  const T* norm_weight;
  const T* norm_bias;  // zeros where the norm has none
  const T* z_bias;     // (NH * DH) added to z first, or null
  const T* skip;
  int64_t heads, head_dim;
  T eps;
};

// The residual stream between two blocks: update = (update + update_bias) + x in place (as the block's bias add and
// residual add round it), normed = LayerNorm(update) * weight + bias, rows of `dim` elements.
template <typename T>
struct AddNormArgs {
  const T* x;            // (rows, dim)
  T* update;             // (rows, dim)
  const T* update_bias;  // (dim,) or null
  const T* weight;
  const T* bias;  // zeros where the norm has none
  T* normed;      // (rows, dim)
  int64_t dim;
  T eps;
};

// Row-major C (M x N) = alpha op(A) (M x K) op(B) (K x N) + beta C (C not read where beta is 0), op the transpose
// where trans_a / trans_b, each matrix with its row stride.
template <typename T>
using Gemm = void (*)(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                      const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

template <typename T>
struct CellArgs {
  const T *q, *k, *v;  // (B * NH, steps, DH) contiguous, steps = whole chunks of length (padding zero)
  const T* igate;      // (B, NH, n), strides igate_strides along B, NH, contiguous along n
  const T* log_f;      // log sigmoid of the forget gates, like igate
  int64_t igate_strides[2], log_f_strides[2];
  T* out;  // h (B, NH, n, DH), strides out_strides along B, NH, n; or null, and
  int64_t out_strides[3];
  const GatedOutputArgs<T>* gated;  // the gated output of h into its z (h, scale unused), or null
  int64_t heads, steps, n, pad, length, block, head_dim;
  bool reverse;
  T eps, row_range, key_lead, state_lead, log_flush, log_scale;
  Gemm<T> gemm;
  std::atomic<bool>* too_wide;  // set by cell_keys_fit
};

// A hint to fetch the cache line at `address` into the L2 cache, to be read (write = false) or written (GCC, Clang;
// elsewhere nothing).
#if defined(__GNUC__)
#define MMSEG_VIL_PREFETCH(address, write) __builtin_prefetch((address), (write), 2)
#else
#define MMSEG_VIL_PREFETCH(address, write) ((void)(address))
#endif

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

// BLAS's matrix products (Fortran interface, 32-bit sizes), as PyTorch's CPU library exports them (MKL or OpenBLAS):
// weak references (GCC, Clang), so that the kernels load without them; then, and with other compilers, blas_found()
// is false and the cell's op is not used.
#if defined(__GNUC__)
#define MMSEG_VIL_BLAS_REFERENCES 1
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // MKL's C interface
}
#endif

namespace mmseg_vil_cpu {
namespace {

#ifdef MMSEG_VIL_BLAS_REFERENCES
bool blas_found() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Gemm<T> by BLAS: the row-major product is the column-major C^T = B^T A^T.
template <typename T>
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const char op_a = trans_a ? 'T' : 'N', op_b = trans_b ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda), ld_c = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&op_b, &op_a, &m, &n, &k, &alpha, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
  else
    dgemm_(&op_b, &op_a, &m, &n, &k, &alpha, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
}

// MKL's products on the calling thread alone for the scope, the thread's setting restored after (elsewhere nothing):
// MKL's results for a shape depend on its thread count (even where it runs on one thread), and the cell's sequences
// are already split over the threads.
class OneBlasThread {
 public:
  OneBlasThread() : saved_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(saved_);
  }

 private:
  int saved_;
};
#else
bool blas_found() { return false; }

template <typename T>
void blas_gemm(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*, int64_t) {}

class OneBlasThread {};
#endif

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

// Whether t (..., N, C) has contiguous rows, each `stride(-2)` elements after the one before across all leading
// dimensions (e.g. one half of a product's columns).
bool rows_strided(const at::Tensor& t) {
  if (t.dim() < 2 || t.stride(-1) != 1 || t.stride(-2) < t.size(-1)) return false;
  int64_t expected = t.stride(-2) * t.size(-2);
  for (int64_t d = t.dim() - 3; d >= 0; --d) {
    if (t.size(d) > 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

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
  TORCH_CHECK(x.dim() == 3 && rows_strided(x) && x.size(1) == height * width, "x: (B, H * W, E), rows strided");
  const int64_t batch = x.size(0), inner = x.size(2);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == inner && conv_weight.size(1) == 1 &&
                  conv_weight.size(2) == conv_weight.size(3) && conv_weight.size(2) % 2 == 1 &&
                  conv_weight.is_contiguous(),
              "conv_weight: (E, 1, K, K) contiguous, K odd");
  TORCH_CHECK(qkv_weight.dim() == 4 && qkv_weight.size(0) == 3 && qkv_weight.size(1) * qkv_weight.size(2) == inner &&
                  qkv_weight.size(2) == qkv_weight.size(3) && qkv_weight.is_contiguous(),
              "qkv_weight: (3, E / S, S, S) contiguous");
  TORCH_CHECK(x_conv.sizes() == x.sizes() && x_conv.is_contiguous(), "x_conv: x's size, contiguous");
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
    const ConvQkvArgs<T> args{x.data_ptr<T>(), x.stride(1), height, width, inner, kernel, block, head_dim, taps.data(),
                              biases.data(), padding.data(), qkv_weight_t.data(), biases.data() + inner,
                              x_conv.data_ptr<T>(), qkv.data_ptr<T>(), strides, gate_a.data(), gate_b.data(),
                              gate_c.data(), num_gates, gates.data_ptr<T>()};
    auto rows = pick(KERNEL_VERSIONS(conv_qkv_rows<T>));
    const int64_t row_work = width * inner * (taps_count + 3 * block + 2 * num_gates);
    at::parallel_for(0, batch * height, std::max<int64_t>(1, kGrainWork / row_work),
                     [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  });
}

// The gated output's tensors besides h: x_conv (B, N, E) contiguous, z (B, N, E) with strided rows (rows_strided),
// norm_weight, skip (E,) contiguous, norm_bias
// and z_bias (E,) contiguous or none, all of `dtype`.
void check_gated_output(const at::Tensor& x_conv, const at::Tensor& z, const std::optional<at::Tensor>& z_bias,
                        const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
                        const at::Tensor& skip, at::ScalarType dtype, int64_t batch, int64_t tokens, int64_t inner) {
  for (const auto* t : {&x_conv, &z, &norm_weight, &skip}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->scalar_type() == dtype && (t == &z ? rows_strided(z) : t->is_contiguous()),
                "tensors of h's dtype, contiguous (z: its rows strided)");
  }
  TORCH_CHECK(x_conv.numel() == batch * tokens * inner && z.numel() == batch * tokens * inner &&
                  x_conv.size(-1) == inner && z.size(-1) == inner && norm_weight.numel() == inner &&
                  skip.numel() == inner,
              "x_conv, z: (B, N, E); norm_weight, skip: (E,)");
  for (const auto* bias : {&norm_bias, &z_bias})
    if (*bias) {
      check_cpu(**bias, "biases");
      TORCH_CHECK((*bias)->numel() == inner && (*bias)->is_contiguous() && (*bias)->scalar_type() == dtype,
                  "norm_bias, z_bias: (E,) contiguous");
    }
}

// GatedOutputArgs of checked tensors, without h; `zeros` (E zeros) stands in for a missing norm bias.
template <typename T>
GatedOutputArgs<T> gated_output_args(const at::Tensor& x_conv, const at::Tensor& z,
                                     const std::optional<at::Tensor>& z_bias, const at::Tensor& norm_weight,
                                     const std::optional<at::Tensor>& norm_bias, const at::Tensor& skip, double eps,
                                     int64_t tokens, int64_t heads, int64_t head_dim, const std::vector<T>& zeros) {
  return GatedOutputArgs<T>{nullptr, {0, 0, 0}, nullptr, {0, 0, 0}, tokens, x_conv.data_ptr<T>(), z.data_ptr<T>(),
                            z.stride(-2), norm_weight.data_ptr<T>(), norm_bias ? norm_bias->data_ptr<T>() : zeros.data(),
                            z_bias ? z_bias->data_ptr<T>() : nullptr, skip.data_ptr<T>(), heads, head_dim,
                            static_cast<T>(eps)};
}

// z = (LayerNorm_per_head(h * h_scale) * norm_weight [+ norm_bias] + skip * x_conv) * silu(z [+ z_bias]) for
// h (B, N, NH, DH) (any strides but along DH), h_scale (B, N, NH, 1) or none (any strides), x_conv, z (B, N, NH * DH)
// contiguous; z_bias: z's bias (NH * DH,) not yet added (the up-projection's).
void gated_output_(const at::Tensor& h, const std::optional<at::Tensor>& h_scale, const at::Tensor& x_conv,
                   const at::Tensor& z, const std::optional<at::Tensor>& z_bias, const at::Tensor& norm_weight,
                   const std::optional<at::Tensor>& norm_bias, const at::Tensor& skip, double eps) {
  check_cpu(h, "h");
  TORCH_CHECK(h.dim() == 4 && h.stride(3) == 1, "h: (B, N, NH, DH), DH contiguous");
  const int64_t batch = h.size(0), tokens = h.size(1), heads = h.size(2), head_dim = h.size(3);
  const int64_t inner = heads * head_dim;
  check_gated_output(x_conv, z, z_bias, norm_weight, norm_bias, skip, h.scalar_type(), batch, tokens, inner);
  if (h_scale) {
    check_cpu(*h_scale, "h_scale");
    TORCH_CHECK(h_scale->dim() == 4 && h_scale->size(0) == batch && h_scale->size(1) == tokens &&
                    h_scale->size(2) == heads && h_scale->size(3) == 1 && h_scale->scalar_type() == h.scalar_type(),
                "h_scale: (B, N, NH, 1) of h's dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gated_output_", [&] {
    using T = scalar_t;
    std::vector<T> zeros(norm_bias ? 0 : inner, T(0));
    GatedOutputArgs<T> args = gated_output_args<T>(x_conv, z, z_bias, norm_weight, norm_bias, skip, eps, tokens,
                                                   heads, head_dim, zeros);
    args.h = h.data_ptr<T>();
    std::copy_n(h.strides().data(), 3, args.h_strides);
    if (h_scale) {
      args.scale = h_scale->data_ptr<T>();
      std::copy_n(h_scale->strides().data(), 3, args.scale_strides);
    }
    auto run = pick(KERNEL_VERSIONS(gated_output_tokens<T>));
    at::parallel_for(0, batch * tokens, std::max<int64_t>(1, kGrainWork / (4 * inner)),
                     [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
}

// update = (update [+ update_bias]) + x in place and normed = LayerNorm(update) * weight [+ bias] for x, update,
// normed (..., D) contiguous: a block's residual add (and its down-projection's bias) fused with the next block's norm.
void add_layer_norm_(const at::Tensor& x, const at::Tensor& update, const std::optional<at::Tensor>& update_bias,
                     const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps,
                     const at::Tensor& normed) {
  const int64_t dim = x.size(-1);
  for (const auto* t : {&x, &update, &weight, &normed}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous(), "tensors of x's dtype, contiguous");
  }
  TORCH_CHECK(update.sizes() == x.sizes() && normed.sizes() == x.sizes() && weight.numel() == dim,
              "update, normed: x's size; weight: (D,)");
  for (const auto* vector : {&update_bias, &bias})
    if (*vector) {
      check_cpu(**vector, "biases");
      TORCH_CHECK((*vector)->numel() == dim && (*vector)->is_contiguous() &&
                      (*vector)->scalar_type() == x.scalar_type(),
                  "update_bias, bias: (D,) contiguous");
    }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_layer_norm_", [&] {
    using T = scalar_t;
    std::vector<T> zeros(bias ? 0 : dim, T(0));
    const AddNormArgs<T> args{x.data_ptr<T>(), update.data_ptr<T>(),
                              update_bias ? update_bias->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                              bias ? bias->data_ptr<T>() : zeros.data(), normed.data_ptr<T>(), dim,
                              static_cast<T>(eps)};
    auto run = pick(KERNEL_VERSIONS(add_layer_norm_rows<T>));
    at::parallel_for(0, dim ? x.numel() / dim : 0, std::max<int64_t>(1, kGrainWork / (4 * std::max<int64_t>(dim, 1))),
                     [&](int64_t begin, int64_t end) { run(args, begin, end); });
  });
}

// Checks the cell's inputs (see cell_); its sizes (B, NH, steps, DH, n).
std::array<int64_t, 5> check_cell(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& igate, const at::Tensor& log_f, int64_t length, int64_t block) {
  TORCH_CHECK(blas_found(), "the cell needs BLAS (sgemm_, dgemm_), which this PyTorch build does not export");
  for (const auto* t : {&q, &k, &v, &igate, &log_f}) {
    check_cpu(*t, "every tensor");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "every tensor of q's dtype");
  }
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && k.is_contiguous() &&
                  v.sizes() == q.sizes() && v.is_contiguous(),
              "q, k, v: (B, NH, steps, DH) contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), steps = q.size(2), n = igate.size(-1);
  TORCH_CHECK(length > 0 && steps % length == 0 && n <= steps && steps - n < length && block > 0,
              "steps: whole chunks of length, at most one chunk of padding");
  for (const auto* t : {&igate, &log_f})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == heads && t->size(2) == n && t->stride(2) == 1,
                "igate, log_f: (B, NH, n), contiguous along n");
  return {batch, heads, steps, q.size(3), n};
}

// Runs the cell of checked inputs: h into out (B, NH, n, DH) if given, else its gated output by `gated`.
template <typename T>
bool run_cell(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& igate,
              const at::Tensor& log_f, int64_t length, int64_t block, bool reverse, double eps, double row_range,
              double key_lead, double state_lead, double log_flush, const at::Tensor* out,
              const GatedOutputArgs<T>* gated) {
  const int64_t batch = q.size(0), heads = q.size(1), steps = q.size(2), head_dim = q.size(3), n = igate.size(-1);
  std::atomic<bool> too_wide{false};
  if (batch * heads == 0 || n == 0) return true;
  const CellArgs<T> args{q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), igate.data_ptr<T>(), log_f.data_ptr<T>(),
                         {igate.stride(0), igate.stride(1)}, {log_f.stride(0), log_f.stride(1)},
                         out ? out->data_ptr<T>() : nullptr,
                         {out ? out->stride(0) : 0, out ? out->stride(1) : 0, out ? out->stride(2) : 0}, gated, heads,
                         steps, n, steps - n, length, block, head_dim, reverse, static_cast<T>(eps),
                         static_cast<T>(row_range), static_cast<T>(key_lead), static_cast<T>(state_lead),
                         static_cast<T>(log_flush), static_cast<T>(-0.5 * std::log(static_cast<double>(head_dim))),
                         &blas_gemm<T>, &too_wide};
  auto check = pick(KERNEL_VERSIONS(cell_keys_fit<T>));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) { check(args, begin, end); });
  if (too_wide.load()) return false;
  auto run = pick(KERNEL_VERSIONS(cell_sequences<T>));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    FlushSubnormals flush;
    OneBlasThread one_thread;
    run(args, begin, end);
  });
  return true;
}

// The factorised chunkwise cell (mlstm/chunkwise_inference.py) of q, k, v (B, NH, steps, DH) contiguous, steps whole
// chunks of `length` (padding zero: behind the n real steps, in front for reverse), igate and log_f = log
// sigmoid(fgate) (B, NH, n) contiguous along n: h into out (B, NH, n, DH), any strides but along DH. Returns false
// (out untouched) where a chunk's keys span more than row_range + key_lead (the general cell must run). `block`:
// rows per block of the scores' products (only blocks with visible keys are computed). Needs blas_found().
bool cell_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& igate,
           const at::Tensor& log_f, int64_t length, int64_t block, bool reverse, double eps, double row_range,
           double key_lead, double state_lead, double log_flush, const at::Tensor& out) {
  const auto [batch, heads, steps, head_dim, n] = check_cell(q, k, v, igate, log_f, length, block);
  check_cpu(out, "out");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == batch && out.size(1) == heads && out.size(2) == n &&
                  out.size(3) == head_dim && out.stride(3) == 1 && out.scalar_type() == q.scalar_type(),
              "out: (B, NH, n, DH) of q's dtype, contiguous along DH");
  bool result = true;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cell_", [&] {
    result = run_cell<scalar_t>(q, k, v, igate, log_f, length, block, reverse, eps, row_range, key_lead, state_lead,
                                log_flush, &out, nullptr);
  });
  return result;
}

// cell_ with gated_output_ (no h_scale) as its epilogue: each head's rows of h, while in cache, give its channels of
// z (B, n, NH * DH) in place; h is not stored. Returns false (z untouched) where cell_ does.
bool cell_gated_output_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& igate,
                        const at::Tensor& log_f, int64_t length, int64_t block, bool reverse, double eps,
                        double row_range, double key_lead, double state_lead, double log_flush,
                        const at::Tensor& x_conv, const at::Tensor& z, const std::optional<at::Tensor>& z_bias,
                        const at::Tensor& norm_weight, const std::optional<at::Tensor>& norm_bias,
                        const at::Tensor& skip, double norm_eps) {
  const auto [batch, heads, steps, head_dim, n] = check_cell(q, k, v, igate, log_f, length, block);
  check_gated_output(x_conv, z, z_bias, norm_weight, norm_bias, skip, q.scalar_type(), batch, n, heads * head_dim);
  bool result = true;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cell_gated_output_", [&] {
    using T = scalar_t;
    std::vector<T> zeros(norm_bias ? 0 : heads * head_dim, T(0));
    const GatedOutputArgs<T> gated = gated_output_args<T>(x_conv, z, z_bias, norm_weight, norm_bias, skip, norm_eps,
                                                          n, heads, head_dim, zeros);
    result = run_cell<T>(q, k, v, igate, log_f, length, block, reverse, eps, row_range, key_lead, state_lead,
                         log_flush, nullptr, &gated);
  });
  return result;
}

}  // namespace
}  // namespace mmseg_vil_cpu

TORCH_LIBRARY(mmseg_vil_cpu, m) {
  m.def("instruction_set() -> str", &mmseg_vil_cpu::instruction_set);
  m.def("blas_found() -> bool", &mmseg_vil_cpu::blas_found);
  m.def(
      "cell_(Tensor q, Tensor k, Tensor v, Tensor igate, Tensor log_f, int length, int block, bool reverse, "
      "float eps, float row_range, float key_lead, float state_lead, float log_flush, Tensor(a!) out) -> bool",
      &mmseg_vil_cpu::cell_);
  m.def(
      "cell_gated_output_(Tensor q, Tensor k, Tensor v, Tensor igate, Tensor log_f, int length, int block, "
      "bool reverse, float eps, float row_range, float key_lead, float state_lead, float log_flush, Tensor x_conv, "
      "Tensor(a!) z, Tensor? z_bias, Tensor norm_weight, Tensor? norm_bias, Tensor skip, float norm_eps) -> bool",
      &mmseg_vil_cpu::cell_gated_output_);
  m.def(
      "conv_qkv(Tensor x, Tensor? x_bias, int height, int width, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor qkv_weight, Tensor? qkv_bias, bool reverse, Tensor gate_weight, Tensor gate_bias, Tensor(a!) x_conv, "
      "Tensor(b!) qkv, Tensor(c!) gates) -> ()",
      &mmseg_vil_cpu::conv_qkv);
  m.def(
      "add_layer_norm_(Tensor x, Tensor(a!) update, Tensor? update_bias, Tensor weight, Tensor? bias, float eps, "
      "Tensor(b!) normed) -> ()",
      &mmseg_vil_cpu::add_layer_norm_);
  m.def(
      "gated_output_(Tensor h, Tensor? h_scale, Tensor x_conv, Tensor(a!) z, Tensor? z_bias, Tensor norm_weight, "
      "Tensor? norm_bias, Tensor skip, float eps) -> ()",
      &mmseg_vil_cpu::gated_output_);
}
