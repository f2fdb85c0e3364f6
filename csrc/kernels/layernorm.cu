// LayerNorm fused with the residual add that precedes it in a pre-LN transformer block:
//   v = x + residual  (written out: it is the new residual stream)
//   out = (v - mean) * rstd * weight + bias
// One read of each input and one write of each output. Statistics are fp32 and, where the
// row fits in registers, exact two-pass (mean first, then the centred sum of squares, both
// over registers: no cancellation as with E[v^2] - E[v]^2).
//
// RMSNorm (gpt-oss) is the same kernels with the mean taken as 0 (NormArgs::rms): the
// centred sum of squares becomes the plain one, and there is no bias.
//
// Variants by hidden size (thresholds in norm_math.cuh):
//   1. warp per row (<= 1024): four rows per 128-thread block, shuffles only;
//   2. block per row, row in registers (<= 16384), reductions through shared memory;
//   3. block per row, streamed (longer rows): Welford statistics merged across the block,
//      then a second sweep re-reads v (from `sum` when fused, else x) to normalise.
// The residual sum is rounded to the storage type before the statistics, so `out` is
// exactly the norm of the `sum` that is written, as when the add and the norm are separate.
#include "launch.h"
#include "norm_math.cuh"

namespace gptext::kernels {
namespace {

constexpr int kStreamThreads = 512;  // threads of the streaming (variant 3) kernel

using dev::from_float;
using dev::to_float;

template <typename T, int VEC>
__device__ __forceinline__ void load_row_chunk(const T* p, int64_t col0, float (&out)[VEC]) {
  if constexpr (VEC > 1) {
    dev::load_floats<VEC>(p + col0, out);
  } else {
    out[0] = to_float(p[col0]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_row_chunk(T* p, int64_t col0, const float (&in)[VEC]) {
  if constexpr (VEC > 1) {
    dev::store_floats<VEC>(p + col0, in);
  } else {
    p[col0] = from_float<T>(in[0]);
  }
}

// Variants 1 and 2; element (it * row_threads + t) * VEC + e of the row, as in softmax.cu.
template <typename T, int VEC, int ITERS, bool kWarpPerRow>
__global__ void __launch_bounds__(dev::row_kernel_threads(kWarpPerRow, kNormRegsMaxCols, VEC * ITERS))
    layernorm_regs_kernel(const NormArgs a) {
  __shared__ float scratch[32];
  const int row_threads = kWarpPerRow ? 32 : blockDim.x;
  const int rows_per_block = blockDim.x / row_threads;
  const int t = threadIdx.x % row_threads;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);

  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / row_threads; row < a.rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const int64_t offset = row * a.cols;
    float v[ITERS][VEC];
    float sum = 0.0f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col0 = (int64_t(it) * row_threads + t) * VEC;
      if (col0 >= a.cols) continue;
      load_row_chunk<T, VEC>(static_cast<const T*>(a.x) + offset, col0, v[it]);
      if (a.residual != nullptr) {
        float r[VEC];
        load_row_chunk<T, VEC>(static_cast<const T*>(a.residual) + offset, col0, r);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[it][e] = dev::round_to<T>(v[it][e] + r[e]);
        store_row_chunk<T, VEC>(static_cast<T*>(a.sum) + offset, col0, v[it]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += v[it][e];
    }
    const float mean = a.rms ? 0.0f : dev::row_sum<kWarpPerRow>(sum, scratch) / float(a.cols);

    float squares = 0.0f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if ((int64_t(it) * row_threads + t) * VEC >= a.cols) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) squares += (v[it][e] - mean) * (v[it][e] - mean);
    }
    const float rstd = norm_rstd(dev::row_sum<kWarpPerRow>(squares, scratch) / float(a.cols), a.eps);
    if (t == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      if (a.rstd != nullptr) a.rstd[row] = rstd;
    }

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col0 = (int64_t(it) * row_threads + t) * VEC;
      if (col0 >= a.cols) continue;
      float w[VEC], b[VEC] = {};
      load_row_chunk<T, VEC>(weight, col0, w);
      if (bias != nullptr) load_row_chunk<T, VEC>(bias, col0, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[it][e] = layernorm_apply(v[it][e], mean, rstd, w[e], b[e]);
      store_row_chunk<T, VEC>(static_cast<T*>(a.out) + offset, col0, v[it]);
    }
  }
}

// Welford merge across a warp; every lane gets the merged state.
__device__ __forceinline__ WelfordState warp_welford(WelfordState s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const WelfordState other = {__shfl_xor_sync(0xffffffffu, s.mean, offset),
                                __shfl_xor_sync(0xffffffffu, s.m2, offset),
                                __shfl_xor_sync(0xffffffffu, s.count, offset)};
    s = welford_merge(s, other);
  }
  return s;
}

// Block-wide Welford merge; every thread gets the merged state. `scratch` holds 96 floats.
__device__ WelfordState block_welford(WelfordState s, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  s = warp_welford(s);
  if (lane == 0) {
    scratch[warp] = s.mean;
    scratch[32 + warp] = s.m2;
    scratch[64 + warp] = s.count;
  }
  __syncthreads();
  s = warp_welford(lane < warps ? WelfordState{scratch[lane], scratch[32 + lane], scratch[64 + lane]}
                                : welford_empty());
  __syncthreads();
  return s;
}

// Variant 3. Each thread re-reads in the second sweep only the elements it wrote in the
// first, so `sum` needs no barrier between the sweeps.
template <typename T>
__global__ void __launch_bounds__(kStreamThreads) layernorm_stream_kernel(const NormArgs a) {
  __shared__ float scratch[96];
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t offset = row * a.cols;
    const T* x = static_cast<const T*>(a.x) + offset;
    const T* residual = a.residual != nullptr ? static_cast<const T*>(a.residual) + offset : nullptr;
    T* sum = a.residual != nullptr ? static_cast<T*>(a.sum) + offset : nullptr;
    T* out = static_cast<T*>(a.out) + offset;

    WelfordState state = welford_empty();
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      float v = to_float(x[c]);
      if (residual != nullptr) {
        v = dev::round_to<T>(v + to_float(residual[c]));
        sum[c] = from_float<T>(v);
      }
      state = welford_push(state, v);
    }
    state = block_welford(state, scratch);
    // RMSNorm's mean of squares from the same statistics: E[v^2] = m2 / n + mean^2.
    const float mean = a.rms ? 0.0f : state.mean;
    const float rstd = norm_rstd(state.m2 / float(a.cols) + (a.rms ? state.mean * state.mean : 0.0f), a.eps);
    if (threadIdx.x == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      if (a.rstd != nullptr) a.rstd[row] = rstd;
    }

    const T* v_src = residual != nullptr ? sum : x;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float b = bias != nullptr ? to_float(bias[c]) : 0.0f;
      out[c] = from_float<T>(layernorm_apply(to_float(v_src[c]), mean, rstd, to_float(weight[c]), b));
    }
  }
}

template <typename T, int VEC>
cudaError_t launch_regs(const NormArgs& a, cudaStream_t stream) {
  return dev::launch_row_kernel<T, VEC, kNormWarpMaxCols, kNormRegsMaxCols>(
      a.rows, a.cols, [&](auto iters, auto warp_per_row, dim3 grid, int threads) {
        layernorm_regs_kernel<T, VEC, decltype(iters)::value, decltype(warp_per_row)::value>
            <<<grid, threads, 0, stream>>>(a);
      });
}

template <typename T>
cudaError_t launch_layernorm(const NormArgs& a, cudaStream_t stream) {
  if (a.cols > kNormRegsMaxCols) {
    layernorm_stream_kernel<T><<<dev::capped_grid(a.rows), kStreamThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  constexpr int kVec = 16 / sizeof(T);
  const void* pointers[] = {a.x, a.residual, a.weight, a.bias, a.out, a.sum};
  bool vectorize = a.cols % kVec == 0;
  for (const void* p : pointers) vectorize = vectorize && dev::is_aligned(p, 16);  // null is aligned
  return vectorize ? launch_regs<T, kVec>(a, stream) : launch_regs<T, 1>(a, stream);
}

}  // namespace

cudaError_t layernorm_forward(const NormArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.cols <= 0 || (args.residual != nullptr && args.sum == nullptr) || (args.rms && args.bias != nullptr)) {
    return cudaErrorInvalidValue;
  }
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] { return launch_layernorm<T>(args, stream); });
}

}  // namespace gptext::kernels
