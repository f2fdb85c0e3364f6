// The CPU kernels' bodies, included by kernels_baseline.cpp and kernels_avx2.cpp, each of
// which defines GPTEXT_CPU_ISA (the namespace) and the compiler's target before including
// it. Everything here has internal linkage, so the two compilations never share code.
//
// The loops are written for the auto-vectoriser: rows are staged in an fp32 buffer, the
// reductions carry `omp simd reduction` clauses (built with -fopenmp-simd: no OpenMP
// runtime) and the transcendental functions are the branch-free ones of common.cuh.
#include <algorithm>
#include <vector>

#include "../kernels/activations.cuh"
#include "../kernels/norm_math.cuh"
#include "../kernels/softmax_math.cuh"
#include "cpu_kernels.h"

namespace gptext::cpu::GPTEXT_CPU_ISA {
namespace {

// Storage formats. 16-bit values are kept as raw bits (uint16_t) and converted exactly as
// the GPU converts them; plain integer storage (not a wrapper struct) keeps the loops
// vectorisable.
struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return bf16_bits_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16_bits(v); }
};
struct F16 {
  using storage = uint16_t;
  static float load(uint16_t v) { return f16_bits_to_float(v); }
  static uint16_t store(float v) { return float_to_f16_bits(v); }
};

template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(F32{});
    case DType::F16:
      return fn(F16{});
    default:
      return fn(BF16{});
  }
}

// Reduction of f(v[i]) over a row with 32 independent partial results (four AVX2
// registers), so the loop runs at load throughput instead of waiting on one accumulator's
// add latency. `combine` must be associative and commutative.
template <typename F, typename Combine>
inline float reduce_row(const float* v, int64_t n, float identity, F f, Combine combine) {
  constexpr int kLanes = 32;
  float partial[kLanes];
  for (float& p : partial) p = identity;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) partial[j] = combine(partial[j], f(v[i + j]));
  }
  for (; i < n; ++i) partial[0] = combine(partial[0], f(v[i]));
  float total = identity;
  for (float p : partial) total = combine(total, p);
  return total;
}

inline float add(float a, float b) { return a + b; }
inline float max_of(float a, float b) { return b > a ? b : a; }  // ignores NaN, as fmaxf does
inline float identity(float v) { return v; }

template <typename Fmt>
void softmax_rows_t(const SoftmaxArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  std::vector<float> buffer(size_t(a.cols));
  float* buf = buffer.data();
  const float k = a.scale * kLog2e;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    const KeyRange keys = attention_key_range(a.causal ? row % a.q_len : 0, a.q_len, a.cols, a.causal, a.window);
    const T* xv = x + keys.begin;
    const int64_t n = keys.end - keys.begin;

#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = Fmt::load(xv[i]);
    const float row_max = reduce_row(buf, n, -INFINITY, identity, max_of);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = softmax_exp(buf[i], row_max, k);
    const float sum = reduce_row(buf, n, 0.0f, identity, add);
    const float inv = softmax_inv_sum(sum);
    std::fill(y, y + keys.begin, Fmt::store(0.0f));
    std::fill(y + keys.end, y + a.cols, Fmt::store(0.0f));
    T* yv = y + keys.begin;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yv[i] = Fmt::store(buf[i] * inv);
  }
}

// Two-pass statistics over the fp32 row buffer, as the GPU does over registers.
template <typename Fmt>
void layernorm_rows_t(const NormArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  std::vector<float> buffer(size_t(a.cols));
  float* buf = buffer.data();
  const int64_t n = a.cols;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    if (a.residual != nullptr) {
      const T* r = static_cast<const T*>(a.residual) + row * n;
      T* s = static_cast<T*>(a.sum) + row * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T v = Fmt::store(Fmt::load(x[i]) + Fmt::load(r[i]));
        s[i] = v;
        buf[i] = Fmt::load(v);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = Fmt::load(x[i]);
    }
    const float mean = reduce_row(buf, n, 0.0f, identity, add) / float(n);
    const float squares = reduce_row(buf, n, 0.0f, [mean](float v) { return (v - mean) * (v - mean); }, add);
    const float rstd = norm_rstd(squares / float(n), a.eps);

    T* out = static_cast<T*>(a.out) + row * n;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        out[i] = Fmt::store(layernorm_apply(buf[i], mean, rstd, Fmt::load(weight[i]), Fmt::load(bias[i])));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = Fmt::store(layernorm_apply(buf[i], mean, rstd, Fmt::load(weight[i]), 0.0f));
    }
    if (a.mean != nullptr) a.mean[row] = mean;
    if (a.rstd != nullptr) a.rstd[row] = rstd;
  }
}

template <typename Fmt, Activation ACT>
void epilogue_rows_act(const GemmArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t row = row_begin; row < row_end; ++row) {
    T* c = static_cast<T*>(a.c) + row * a.ldc;
    const T* residual = a.residual != nullptr ? static_cast<const T*>(a.residual) + row * a.ldc : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < a.n; ++i) {
      const float b = bias != nullptr ? Fmt::load(bias[i]) : 0.0f;
      const float r = residual != nullptr ? Fmt::load(residual[i]) : 0.0f;
      c[i] = Fmt::store(linear_epilogue(Fmt::load(c[i]), b, ACT, r));
    }
  }
}

template <typename Fmt>
void epilogue_rows_t(const GemmArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.act) {
    case Activation::Gelu:
      return epilogue_rows_act<Fmt, Activation::Gelu>(a, row_begin, row_end);
    case Activation::Relu:
      return epilogue_rows_act<Fmt, Activation::Relu>(a, row_begin, row_end);
    default:
      return epilogue_rows_act<Fmt, Activation::None>(a, row_begin, row_end);
  }
}

}  // namespace

void softmax_rows(DType dtype, const SoftmaxArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) { softmax_rows_t<decltype(tag)>(args, row_begin, row_end); });
}

void layernorm_rows(DType dtype, const NormArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) { layernorm_rows_t<decltype(tag)>(args, row_begin, row_end); });
}

void epilogue_rows(DType dtype, const GemmArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) { epilogue_rows_t<decltype(tag)>(args, row_begin, row_end); });
}

}  // namespace gptext::cpu::GPTEXT_CPU_ISA
