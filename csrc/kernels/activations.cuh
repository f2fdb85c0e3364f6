// Activation functions and the GEMM epilogue, shared by the CUDA GEMMs (gemm_wmma.cu and
// the epilogue after cuBLAS in epilogue.cu) and the CPU linear.
#pragma once

#include "common.cuh"

namespace gptext {

// Values are part of the op schema's contract with csrc/ops.cpp.
enum class Activation : int { None = 0, Gelu = 1, Relu = 2 };

// GPT-2's GELU, the tanh approximation ("gelu_new"):
//   0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
GPTEXT_HD float gelu_tanh(float x) {
  const float sqrt_2_over_pi = 0.7978845608028654f;
  const float inner = sqrt_2_over_pi * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + tanh_act(inner));
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

// out = act(acc + bias) + residual: the fused epilogue of `linear`. Callers pass 0 for a
// missing bias or residual.
GPTEXT_HD float linear_epilogue(float acc, float bias, Activation act, float residual) {
  return apply_activation(act, acc + bias) + residual;
}

}  // namespace gptext
