// Row softmax, with the attention-score options (scale, causal mask, sliding window).
//
// Three variants, picked by row length (thresholds in softmax_math.cuh):
//   1. warp per row, the row in registers (cols <= 1024): one read, one write, reductions
//      by warp shuffles only. Four rows per 128-thread block.
//   2. block per row, the row in registers spread over up to 1024 threads (cols <= 16384):
//      still one read and one write; the reductions go through shared memory.
//   3. block per row, online (longer rows: vocabulary-sized logits). Each thread keeps a
//      running (max, sum) pair while streaming its slice of the row once; the pairs merge
//      through shared memory; a second sweep writes the probabilities. Two reads instead of
//      the three of a max / sum / normalise softmax, and the second read mostly hits L2.
// Math is fp32 whatever the storage type. 128-bit loads and stores where the row length
// and the pointers allow; element-wise tails otherwise.
#include "launch.h"
#include "softmax_math.cuh"

namespace gptext::kernels {
namespace {

constexpr int kOnlineThreads = 1024;  // threads of the online (variant 3) kernel

using dev::from_float;
using dev::to_float;

__device__ __forceinline__ KeyRange row_keys(const SoftmaxArgs& a, int64_t row) {
  return attention_key_range(a.causal ? row % a.q_len : 0, a.q_len, a.cols, a.causal, a.window);
}

__device__ __forceinline__ bool visible(const KeyRange& keys, int64_t col) {
  return col >= keys.begin && col < keys.end;
}

// Variants 1 and 2. A row is covered by `row_threads` threads (a warp, or the block) in
// ITERS steps of VEC contiguous elements each: element (it * row_threads + t) * VEC + v.
// With VEC > 1 the row length is a multiple of VEC, so a pack is either whole or absent.
template <typename T, int VEC, int ITERS, bool kWarpPerRow>
__global__ void __launch_bounds__(dev::row_kernel_threads(kWarpPerRow)) softmax_regs_kernel(const SoftmaxArgs a) {
  __shared__ float scratch[32];
  const int row_threads = kWarpPerRow ? 32 : blockDim.x;
  const int rows_per_block = blockDim.x / row_threads;
  const int t = threadIdx.x % row_threads;
  const float k = a.scale * kLog2e;

  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / row_threads; row < a.rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    const KeyRange keys = row_keys(a, row);

    float v[ITERS][VEC];
    float row_max = -INFINITY;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col0 = (int64_t(it) * row_threads + t) * VEC;
      if (col0 < a.cols) {
        if constexpr (VEC > 1) {
          dev::load_floats<VEC>(x + col0, v[it]);
        } else {
          v[it][0] = to_float(x[col0]);
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (!visible(keys, col0 + e)) v[it][e] = -INFINITY;
        row_max = fmaxf(row_max, v[it][e]);
      }
    }
    row_max = dev::row_max<kWarpPerRow>(row_max, scratch);

    float sum = 0.0f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[it][e] = softmax_exp(v[it][e], row_max, k);
        sum += v[it][e];
      }
    const float inv = softmax_inv_sum(dev::row_sum<kWarpPerRow>(sum, scratch));

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col0 = (int64_t(it) * row_threads + t) * VEC;
      if (col0 >= a.cols) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[it][e] *= inv;
      if constexpr (VEC > 1) {
        dev::store_floats<VEC>(y + col0, v[it]);
      } else {
        y[col0] = from_float<T>(v[it][0]);
      }
    }
  }
}

// Visits every column of a row once, split over the block's threads: a scalar head up to
// the first 16-byte boundary, 16-byte packs, a scalar tail. `fn(col, values, count)` gets
// `count` consecutive elements starting at `col`; count is std::integral_constant<int, VEC>
// or <int, 1>, so that fn's loops over the values unroll and the values stay in registers
// (a runtime count indexes them dynamically, which puts them in local memory).
template <typename T, int VEC, typename Fn>
__device__ __forceinline__ void for_each_chunk(const T* x, int64_t cols, bool vectorize, Fn&& fn) {
  int64_t head = cols;
  if (vectorize) {
    const int64_t misalign = (reinterpret_cast<uintptr_t>(x) / sizeof(T)) % VEC;
    head = misalign == 0 ? 0 : (VEC - misalign < cols ? VEC - misalign : cols);
  }
  const int64_t packs = (cols - head) / VEC;
  for (int64_t c = threadIdx.x; c < head; c += blockDim.x) {
    const float one[1] = {to_float(x[c])};
    fn(c, one, std::integral_constant<int, 1>{});
  }
#pragma unroll 4
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float vals[VEC];
    dev::load_floats<VEC>(x + head + p * VEC, vals);
    fn(head + p * VEC, vals, std::integral_constant<int, VEC>{});
  }
  for (int64_t c = head + packs * VEC + threadIdx.x; c < cols; c += blockDim.x) {
    const float one[1] = {to_float(x[c])};
    fn(c, one, std::integral_constant<int, 1>{});
  }
}

// Variant 3: the online softmax, one block per row.
template <typename T>
__global__ void __launch_bounds__(kOnlineThreads) softmax_online_kernel(const SoftmaxArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float scratch[32];
  const float k = a.scale * kLog2e;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    const KeyRange keys = row_keys(a, row);
    // x and y may only share the vector path if their rows are equally misaligned.
    const bool vectorize = (reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(y)) % 16 == 0;

    SoftmaxStats stats = softmax_stats_empty();
    for_each_chunk<T, VEC>(x, a.cols, vectorize, [&](int64_t col, const float* vals, auto count) {
      constexpr int kCount = decltype(count)::value;
      // Max of the chunk first, so the running sum is rescaled once per chunk, not per element.
      float chunk_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < kCount; ++e)
        if (visible(keys, col + e)) chunk_max = fmaxf(chunk_max, vals[e]);
      SoftmaxStats chunk = {chunk_max, 0.0f};
#pragma unroll
      for (int e = 0; e < kCount; ++e)
        if (visible(keys, col + e)) chunk.sum += softmax_exp(vals[e], chunk_max, k);
      stats = softmax_stats_merge(stats, chunk, k);
    });

    // Block merge of the (max, sum) pairs: the max first, then every sum rescaled to it.
    const float row_max = dev::block_max(stats.max, scratch);
    const float inv = softmax_inv_sum(dev::block_sum(stats.sum * softmax_exp(stats.max, row_max, k), scratch));

    for_each_chunk<T, VEC>(x, a.cols, vectorize, [&](int64_t col, const float* vals, auto count) {
      constexpr int kCount = decltype(count)::value;
      float p[kCount];
#pragma unroll
      for (int e = 0; e < kCount; ++e) p[e] = visible(keys, col + e) ? softmax_exp(vals[e], row_max, k) * inv : 0.0f;
      if constexpr (kCount == VEC) {
        dev::store_floats<VEC>(y + col, p);
      } else {
        y[col] = from_float<T>(p[0]);
      }
    });
  }
}

template <typename T, int VEC>
cudaError_t launch_regs(const SoftmaxArgs& a, cudaStream_t stream) {
  return dev::launch_row_kernel<VEC, kSoftmaxWarpMaxCols>(a.rows, a.cols, [&](auto iters, auto warp_per_row,
                                                                               dim3 grid, int threads) {
    softmax_regs_kernel<T, VEC, decltype(iters)::value, decltype(warp_per_row)::value>
        <<<grid, threads, 0, stream>>>(a);
  });
}

template <typename T>
cudaError_t launch_softmax(const SoftmaxArgs& a, cudaStream_t stream) {
  if (a.cols > kSoftmaxBlockMaxCols) {
    softmax_online_kernel<T><<<dev::capped_grid(a.rows), kOnlineThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = a.cols % kVec == 0 && dev::is_aligned(a.x, 16) && dev::is_aligned(a.y, 16);
  return vectorize ? launch_regs<T, kVec>(a, stream) : launch_regs<T, 1>(a, stream);
}

}  // namespace

cudaError_t softmax_forward(const SoftmaxArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0 || args.cols == 0) return cudaSuccess;
  if (!(args.scale > 0.0f) || (args.causal && args.q_len <= 0)) return cudaErrorInvalidValue;
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] { return launch_softmax<T>(args, stream); });
}

}  // namespace gptext::kernels
