// The launcher API of gptext's CUDA kernels: plain pointers, sizes and a stream, no torch.
// csrc/cuda_ops.cpp checks tensors and calls these; csrc/tests/ calls them directly.
//
// Every launcher returns the CUDA error of its launch (cudaSuccess when there was nothing
// to do), never aborts, and accepts empty problems. Pointers must be device pointers of
// contiguous row-major data of the given DType; where 128-bit alignment would help, the
// kernels check it and take a scalar path when it is missing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "args.h"
#include "gemm_tiles.cuh"

namespace gptext::kernels {

using ::gptext::GemmArgs;
using ::gptext::NormArgs;
using ::gptext::SoftmaxArgs;

// ---- softmax (softmax.cu): SoftmaxArgs in args.h -------------------------------------
cudaError_t softmax_forward(const SoftmaxArgs& args, DType dtype, cudaStream_t stream);

// ---- LayerNorm, optionally fused with the residual add (layernorm.cu) -----------------
cudaError_t layernorm_forward(const NormArgs& args, DType dtype, cudaStream_t stream);

// ---- GEMM with a fused epilogue (gemm_wmma.cu, epilogue.cu) ----------------------------
// Tensor Core (nvcuda::wmma) GEMM: bf16 or fp16 in, fp32 accumulate, output in the input
// type. Needs sm_80 or newer; returns cudaErrorInvalidDeviceFunction for F32. The block
// tile is `tile` (gemm_tiles.cuh); gemm_default_tile(m, n, sm_count) is the unmeasured choice.
cudaError_t gemm_wmma(const GemmArgs& args, DType dtype, GemmTile tile, cudaStream_t stream);
// The same epilogue applied in place to a product already in c (the cuBLAS path):
// c = act(c + bias) + residual.
cudaError_t gemm_epilogue(const GemmArgs& args, DType dtype, cudaStream_t stream);

// ---- fused attention (attention_fwd.cu, attention_bwd.cu) -----------------------------
// Tensor-core kernels for bf16/fp16 with head_dim 64 or 128 (anything else returns
// cudaErrorInvalidValue); q, k, v, grad_out rows must start 16-byte aligned (strides
// multiples of 8 elements, aligned base pointers).
bool attention_supported(const AttentionArgs& args, DType dtype);

// Split-KV ("flash decoding"): when the query tiles alone can't fill the GPU, each tile's
// keys are split over `splits` thread blocks whose partial results (fp32, normalised, with
// their log-sum-exp) a combine step merges. The caller allocates that workspace:
// out: splits x batch x heads x q_len x head_dim floats, lse: splits x batch x heads x q_len.
struct AttentionWorkspace {
  int splits;
  float* out;
  float* lse;
};
int attention_forward_splits(const AttentionArgs& args, int sm_count);
cudaError_t attention_forward(const AttentionArgs& args, DType dtype, const AttentionWorkspace& workspace,
                              cudaStream_t stream);
cudaError_t attention_backward(const AttentionGradArgs& args, DType dtype, cudaStream_t stream);

// ---- build information (info.cu) ------------------------------------------------------
// The compute capability the kernels' best binary for `device` targets (e.g. 90 for
// sm_90), or 0 when none of the compiled arches can run there.
int kernels_binary_arch(int device);
// CUDA runtime version the kernels were compiled against (e.g. 13000).
int kernels_cuda_version();

}  // namespace gptext::kernels
