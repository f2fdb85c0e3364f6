// Activation functions and the GEMM epilogue, shared by the CUDA GEMMs (gemm_wmma.cu and
// the epilogue after cuBLAS in epilogue.cu) and the CPU linear.
#pragma once

#include "common.cuh"

namespace gptext {

// Values are part of the op schema's contract with csrc/ops.cpp.
enum class Activation : int { None = 0, Gelu = 1, Relu = 2 };

// GPT-2's GELU, the tanh approximation ("gelu_new"):
//   0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 * x^3)
// On the device as written, with the accurate tanhf (the epilogue is not the bottleneck of
// a GEMM). On the host as x * sigmoid(2u) = x / (1 + 2^v), v = -2 log2(e) u = x (kGeluV1 +
// kGeluV3 x^2): one exp2_approx and one division, no tanh, and no cancellation in 1 + tanh
// for negative x. Below kGeluLow, v passes 126 and exp2_approx's clamp at 2^127 would
// leave x / 2^127 (-0.6 at -1e38) where GELU is 0 to float precision (-1e-37 at -10): the
// result there is x * 0, which is -0, and NaN at -inf as in PyTorch. The CPU kernels'
// vectors compute the same (activation_lanes, the division a refined reciprocal estimate).
constexpr float kGeluV1 = -2.302208198144325f;   // -2 log2(e) sqrt(2/pi)
constexpr float kGeluV3 = -0.1029432395800235f;  // kGeluV1 * 0.044715
constexpr float kGeluLow = -10.0f;
GPTEXT_HD float gelu_tanh(float x) {
#if defined(__CUDA_ARCH__)
  const float sqrt_2_over_pi = 0.7978845608028654f;
  const float inner = sqrt_2_over_pi * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
#else
  return x >= kGeluLow ? x / (1.0f + exp2_approx(x * (kGeluV1 + kGeluV3 * (x * x)))) : x * 0.0f;
#endif
}

GPTEXT_HD float apply_activation(Activation act, float x) {
  switch (act) {
    case Activation::Gelu:
      return gelu_tanh(x);
    case Activation::Relu:
      return x > 0.0f ? x : 0.0f;
    default:
      return x;
  }
}

// gpt-oss's clamped SwiGLU of one (gate, linear) pair, as its experts apply it:
//   gate * sigmoid(kSwigluAlpha * gate) * (linear + 1),
// the gate clamped above at limit, the linear half to [-limit, limit]. A NaN passes the
// clamps as NaN (as torch.clamp leaves it), and gate = -inf gives NaN (-inf * 0), as in
// PyTorch. The accurate expf on both sides: this runs once per output, after a dot product.
constexpr float kSwigluAlpha = 1.702f;
GPTEXT_HD float swiglu_clamped(float gate, float linear, float limit) {
  gate = gate > limit ? limit : gate;
  linear = linear > limit ? limit : (linear < -limit ? -limit : linear);
  return gate / (1.0f + expf(-kSwigluAlpha * gate)) * (linear + 1.0f);
}

// out = act(acc + bias) + residual: the fused epilogue of `linear`. Callers pass 0 for a
// missing bias or residual.
GPTEXT_HD float linear_epilogue(float acc, float bias, Activation act, float residual) {
  return apply_activation(act, acc + bias) + residual;
}

}  // namespace gptext
