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

using ::gptext::CrossEntropyArgs;
using ::gptext::ExpertArgs;
using ::gptext::RopeArgs;
using ::gptext::GemmArgs;
using ::gptext::NormArgs;
using ::gptext::SoftmaxArgs;

// ---- softmax (softmax.cu): SoftmaxArgs in args.h -------------------------------------
cudaError_t softmax_forward(const SoftmaxArgs& args, DType dtype, cudaStream_t stream);

// ---- cross-entropy of logits rows (softmax.cu): CrossEntropyArgs in args.h ------------
cudaError_t cross_entropy_forward(const CrossEntropyArgs& args, DType dtype, cudaStream_t stream);
cudaError_t cross_entropy_backward(const CrossEntropyArgs& args, DType dtype, cudaStream_t stream);

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

// ---- RoPE (rope.cu): RopeArgs in args.h; out must not overlap x -----------------------
cudaError_t rope_forward(const RopeArgs& args, DType dtype, cudaStream_t stream);

// ---- expert linear layers of a mixture of experts (experts.cu): ExpertArgs in args.h ---
// One warp per group of output columns of one route, reading the expert's rows in place
// (no gather of the weights, no host-side grouping by expert): the decode step's form,
// where few routes each stream their expert's matrix once.
cudaError_t expert_linear_forward(const ExpertArgs& args, DType dtype, cudaStream_t stream);
// The prefill's form (bf16/fp16, sm_80+; gemm_wmma.cu): the routes grouped by expert, one
// WMMA GEMM tile per 64 or 128 routes of one expert, x's rows gathered as the tiles load.
// order (routes,) holds the route ids sorted by bucket; offsets (num_experts + 2,) the
// buckets' starts in it, bucket num_experts being the routes whose index is out of range
// (their rows become NaN). Both stay on the device: nothing is read back to the host.
cudaError_t expert_linear_grouped(const ExpertArgs& args, const int64_t* order, const int64_t* offsets, DType dtype,
                                  cudaStream_t stream);

// ---- fused attention (attention_fwd.cu, attention_bwd.cu) -----------------------------
// Tensor-core kernels for bf16/fp16 with head_dim 64 or 128, heads a multiple of kv_heads > 0
// (anything else returns cudaErrorInvalidValue); q, k, v, grad_out rows must start 16-byte
// aligned (strides multiples of 8 elements, aligned base pointers).
bool attention_supported(const AttentionArgs& args, DType dtype);

// How one forward call is launched. attention_forward_plan chooses from the problem and the
// GPU; any valid plan computes the same result, so tests may force either form:
//   warp_rows  query rows a warp owns: 16 (one tile of mma.sync rows), or 32 (two tiles
//              that share every K and V fragment read from shared memory: half the
//              shared-memory reads per product, more registers, 128-row blocks);
//   splits     split-KV ("flash decoding"): when the query tiles alone can't fill the GPU,
//              each tile's keys are split over `splits` thread blocks (1 to 64) whose
//              partial results (fp32, normalised, with their log-sum-exp) a combine step
//              merges into the output;
//   out, lse   that workspace, which the caller allocates when splits > 1:
//              out: splits x batch x heads x q_len x head_dim floats, lse: splits x batch x
//              heads x q_len floats.
struct AttentionPlan {
  int warp_rows;
  int splits;
  float* out;
  float* lse;
};
// smem_per_sm: the device's shared memory per multiprocessor, in bytes; warp_rows 0 chooses,
// 16 or 32 forces that form (tests, benchmarks). The plan's out and lse are null.
AttentionPlan attention_forward_plan(const AttentionArgs& args, int sm_count, int64_t smem_per_sm,
                                     int warp_rows = 0);
// cudaErrorInvalidValue for an invalid plan (warp_rows not 16 or 32, splits out of range,
// or a missing workspace).
cudaError_t attention_forward(const AttentionArgs& args, DType dtype, const AttentionPlan& plan,
                              cudaStream_t stream);
cudaError_t attention_backward(const AttentionGradArgs& args, DType dtype, cudaStream_t stream);

// ---- build information (info.cu) ------------------------------------------------------
// The compute capability the kernels' best binary for `device` targets (e.g. 90 for
// sm_90), or 0 when none of the compiled arches can run there.
int kernels_binary_arch(int device);
// CUDA runtime version the kernels were compiled against (e.g. 13000).
int kernels_cuda_version();

}  // namespace gptext::kernels
