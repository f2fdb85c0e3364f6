// The math of LayerNorm (and its residual-fused form), shared by the CUDA kernels
// (layernorm.cu) and the CPU implementation. Statistics are fp32 whatever the storage
// type; the variance is biased (divides by the row length), as in torch and GPT-2.
#pragma once

#include "common.cuh"

namespace gptext {

// Mean and sum of squared deviations of a set of values, combinable in any order (Chan et
// al.'s parallel update). Used where a row is streamed instead of held in registers.
struct WelfordState {
  float mean;
  float m2;     // sum of (x - mean)^2
  float count;  // fp32 is exact for counts up to 2^24, far beyond any row length here
};

GPTEXT_HD WelfordState welford_empty() { return {0.0f, 0.0f, 0.0f}; }

GPTEXT_HD WelfordState welford_push(WelfordState s, float x) {
  const float count = s.count + 1.0f;
  const float delta = x - s.mean;
  const float mean = s.mean + delta / count;
  return {mean, s.m2 + delta * (x - mean), count};
}

GPTEXT_HD WelfordState welford_merge(WelfordState a, WelfordState b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return welford_empty();
  const float delta = b.mean - a.mean;
  const float wb = b.count / count;
  return {a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb, count};
}

GPTEXT_HD float norm_rstd(float variance, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(variance + eps);
#else
  return 1.0f / std::sqrt(variance + eps);
#endif
}

// One normalised, scaled and shifted element. `bias` is 0 when the norm has none.
GPTEXT_HD float layernorm_apply(float v, float mean, float rstd, float weight, float bias) {
  return (v - mean) * rstd * weight + bias;
}

// Hidden sizes up to this are normalised with the row in registers (a warp up to
// kNormWarpMaxCols, else a block); longer rows stream twice with Welford statistics.
constexpr int64_t kNormWarpMaxCols = 1024;
constexpr int64_t kNormRegsMaxCols = 16384;

}  // namespace gptext
