// Row softmax, with the attention-score options (scale, causal mask, sliding window), and
// the cross-entropy of logits rows built on its online variant (unverified: not yet run on
// a GPU).
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
//   4. on sm_90, in place of 3 up to kSoftmaxClusterMaxCols: a cluster of kClusterBlocks
//      blocks per row, the row in the cluster's registers, so one read and one write as in
//      1 and 2 (and one exponential per element); the blocks' (max, sum) pairs meet in
//      distributed shared memory (each block reads its peers' through map_shared_rank),
//      one cluster barrier a row. Unverified: not yet run on a GPU.
// Math is fp32 whatever the storage type. 128-bit loads and stores where the row length
// and the pointers allow; element-wise tails otherwise. The maxima keep NaN (dev::nan_max):
// a visible NaN makes its whole row NaN, as in PyTorch, wherever in the row it sits.
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>

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

// v <- softmax_exp(v, max, k) for a thread's register tile of a row; returns their sum.
template <int ITERS, int VEC>
__device__ __forceinline__ float exp_in_place(float (&v)[ITERS][VEC], float max, float k) {
  float sum = 0.0f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it)
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      v[it][e] = softmax_exp(v[it][e], max, k);
      sum += v[it][e];
    }
  return sum;
}

// Variants 1 and 2. A row is covered by `row_threads` threads (a warp, or the block) in
// ITERS steps of VEC contiguous elements each: element (it * row_threads + t) * VEC + v.
// With VEC > 1 the row length is a multiple of VEC, so a pack is either whole or absent.
template <typename T, int VEC, int ITERS, bool kWarpPerRow>
__global__ void __launch_bounds__(dev::row_kernel_threads(kWarpPerRow, kSoftmaxBlockMaxCols, VEC * ITERS))
    softmax_regs_kernel(const SoftmaxArgs a) {
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
        row_max = dev::nan_max(row_max, v[it][e]);
      }
    }
    row_max = dev::row_max<kWarpPerRow>(row_max, scratch);

    const float sum = exp_in_place(v, row_max, k);
    const float inv = softmax_inv_sum(dev::row_sum<kWarpPerRow>(sum, scratch));

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t col0 = (int64_t(it) * row_threads + t) * VEC;
      if (col0 >= a.cols) continue;
      // A masked key is 0 even in a row whose max is NaN or +inf (where its exp is NaN).
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[it][e] = visible(keys, col0 + e) ? v[it][e] * inv : 0.0f;
      if constexpr (VEC > 1) {
        dev::store_floats<VEC>(y + col0, v[it]);
      } else {
        y[col0] = from_float<T>(v[it][0]);
      }
    }
  }
}

// The elements of a row of `cols` at x before its first 16-byte boundary (VEC of them make
// 16 bytes): the scalar head in front of its 128-bit packs.
template <int VEC, typename T>
__device__ __forceinline__ int64_t row_head(const T* x, int64_t cols) {
  const int64_t misalign = (reinterpret_cast<uintptr_t>(x) / sizeof(T)) % VEC;
  return misalign == 0 ? 0 : (VEC - misalign < cols ? VEC - misalign : cols);
}

// Visits every column of a row once, split over the block's threads: a scalar head up to
// the first 16-byte boundary, 16-byte packs, a scalar tail. `fn(col, values, count)` gets
// `count` consecutive elements starting at `col`; count is std::integral_constant<int, VEC>
// or <int, 1>, so that fn's loops over the values unroll and the values stay in registers
// (a runtime count indexes them dynamically, which puts them in local memory).
template <typename T, int VEC, typename Fn>
__device__ __forceinline__ void for_each_chunk(const T* x, int64_t cols, bool vectorize, Fn&& fn) {
  const int64_t head = vectorize ? row_head<VEC>(x, cols) : cols;
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
        if (visible(keys, col + e)) chunk_max = dev::nan_max(chunk_max, vals[e]);
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

// Cross-entropy against a target per row (CrossEntropyArgs), one block per row. Forward:
// the online (max, sum) of the row as variant 3 takes them, one read of the logits; thread
// 0 writes the row's log-sum-exp and loss. Backward: one read of the logits and one write
// of their gradient, the probabilities recomputed from the saved log-sum-exp.
template <typename T>
__global__ void __launch_bounds__(kOnlineThreads) cross_entropy_kernel(const CrossEntropyArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ float scratch[32];
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    SoftmaxStats stats = softmax_stats_empty();
    for_each_chunk<T, VEC>(x, a.cols, true, [&](int64_t, const float* vals, auto count) {
      constexpr int kCount = decltype(count)::value;
      float chunk_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < kCount; ++e) chunk_max = dev::nan_max(chunk_max, vals[e]);
      SoftmaxStats chunk = {chunk_max, 0.0f};
#pragma unroll
      for (int e = 0; e < kCount; ++e) chunk.sum += softmax_exp(vals[e], chunk_max, kLog2e);
      stats = softmax_stats_merge(stats, chunk, kLog2e);
    });
    const float row_max = dev::block_max(stats.max, scratch);
    const float sum = dev::block_sum(stats.sum * softmax_exp(stats.max, row_max, kLog2e), scratch);
    if (threadIdx.x == 0) {
      const float log_sum = logf(sum);
      const int64_t target = a.targets[row];
      a.lse[row] = row_max == -INFINITY ? -INFINITY : row_max + log_sum;
      // (max - x[t]) + log(sum), not lse - x[t]: no cancellation where the logits are large.
      a.loss[row] = target == a.ignore_index                ? 0.0f
                    : (target >= 0 && target < a.cols) ? (row_max - to_float(x[target])) + log_sum
                                                           : NAN;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kOnlineThreads) cross_entropy_backward_kernel(const CrossEntropyArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* dx = static_cast<T*>(a.dx) + row * a.cols;
    const int64_t target = a.targets[row];
    const bool valid = target != a.ignore_index && target >= 0 && target < a.cols;
    const float lse = a.lse[row], g = valid ? a.grad[row] : 0.0f;
    // x and dx share the vector path only if their rows are equally misaligned.
    const bool vectorize = (reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(dx)) % 16 == 0;
    for_each_chunk<T, VEC>(x, a.cols, vectorize, [&](int64_t col, const float* vals, auto count) {
      constexpr int kCount = decltype(count)::value;
      float d[kCount];
#pragma unroll
      for (int e = 0; e < kCount; ++e) {
        const float p = softmax_exp(vals[e], lse, kLog2e) - (col + e == target ? 1.0f : 0.0f);
        d[e] = valid ? p * g : 0.0f;
      }
      if constexpr (kCount == VEC) {
        dev::store_floats<VEC>(dx + col, d);
      } else {
        dx[col] = from_float<T>(d[0]);
      }
    });
  }
}

// Variant 4: a cluster of kClusterBlocks blocks per row (rows strided over the clusters).
// The row is a scalar head up to the first 16-byte boundary, packs of VEC, a scalar tail:
// pack p goes to cluster thread p % G (G = the cluster's threads) in step p / G, coalesced
// across the cluster; the head's and tail's elements (fewer than VEC each) to the first
// threads of block 0, one each. Every element of a thread stays in registers from the load
// to the store. Each block reduces its part to a (max, sum) pair, the sum taken against its
// own max, and publishes it in its shared memory; after one cluster barrier every block
// merges all the pairs (the same values in the same order, so every block gets the same
// row max and sum) and rescales its probabilities once. The pairs alternate between two
// slots by row, so a block that runs ahead cannot overwrite a pair a peer has yet to read
// (it would first have to pass the next row's barrier, which the peer reaches only after
// reading); the barrier after the loop keeps a block's shared memory alive until its peers
// are done with it.
constexpr int kClusterBlocks = 8;       // the portable cluster size
constexpr int kClusterThreads = 512;    // threads per block

template <typename T, int ITERS>
__global__ void __launch_bounds__(kClusterThreads) softmax_cluster_kernel(const SoftmaxArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int G = kClusterBlocks * kClusterThreads;
  __shared__ float scratch[32];
  __shared__ float2 block_stat[2];  // this block's (max, sum) of a row, by row parity
  cg::cluster_group cluster = cg::this_cluster();
  const int g = int(cluster.block_rank()) * kClusterThreads + threadIdx.x;
  const int64_t clusters = gridDim.x / kClusterBlocks;
  const float k = a.scale * kLog2e;

  int slot = 0;
  for (int64_t row = blockIdx.x / kClusterBlocks; row < a.rows; row += clusters, slot ^= 1) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    const KeyRange keys = row_keys(a, row);
    const int64_t head = row_head<VEC>(x, a.cols);
    const int64_t packs = (a.cols - head) / VEC, tail = head + packs * VEC;
    // The one head or tail element this thread holds, if any.
    const int64_t extra_col = g < head ? g : (g - head < a.cols - tail ? tail + (g - head) : -1);

    float v[ITERS][VEC];
    float extra = -INFINITY, part_max = -INFINITY;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t p = int64_t(it) * G + g;
      if (p < packs) {
        dev::load_floats<VEC>(x + head + p * VEC, v[it]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[it][e] = -INFINITY;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (!visible(keys, head + p * VEC + e)) v[it][e] = -INFINITY;
        part_max = dev::nan_max(part_max, v[it][e]);
      }
    }
    if (extra_col >= 0 && visible(keys, extra_col)) extra = to_float(x[extra_col]);
    part_max = dev::block_max(dev::nan_max(part_max, extra), scratch);

    extra = softmax_exp(extra, part_max, k);
    const float part_sum = dev::block_sum(exp_in_place(v, part_max, k) + extra, scratch);

    if (threadIdx.x == 0) block_stat[slot] = make_float2(part_max, part_sum);
    cluster.sync();
    float2 stat[kClusterBlocks];
#pragma unroll
    for (int r = 0; r < kClusterBlocks; ++r) stat[r] = cluster.map_shared_rank(block_stat, r)[slot];
    float row_max = -INFINITY;
#pragma unroll
    for (int r = 0; r < kClusterBlocks; ++r) row_max = dev::nan_max(row_max, stat[r].x);
    float row_sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kClusterBlocks; ++r) row_sum += stat[r].y * softmax_exp(stat[r].x, row_max, k);
    // This block's probabilities were taken against its own max.
    const float scale = softmax_exp(part_max, row_max, k) * softmax_inv_sum(row_sum);

#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t p = int64_t(it) * G + g;
      if (p >= packs) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[it][e] = visible(keys, head + p * VEC + e) ? v[it][e] * scale : 0.0f;
      dev::store_floats<VEC>(y + head + p * VEC, v[it]);
    }
    if (extra_col >= 0) y[extra_col] = from_float<T>(visible(keys, extra_col) ? extra * scale : 0.0f);
  }
  cluster.sync();
#else
  __trap();  // clusters need sm_90; the host launches this only where a sm_90+ binary runs
#endif
}

// The smallest ITERS (a power of two, up to kSoftmaxClusterMaxCols) for which a cluster
// holds `cols` elements.
template <typename T, typename Fn>
cudaError_t dispatch_cluster_iters(int64_t cols, Fn&& fn) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int kMaxIters = int(kSoftmaxClusterMaxCols / (kClusterBlocks * kClusterThreads * VEC));
  static_assert(kMaxIters * kClusterBlocks * kClusterThreads * VEC == kSoftmaxClusterMaxCols, "whole steps");
  // One pack fewer than the row's elements / VEC may hold a whole step: the head and tail
  // elements ride in the extra register.
  return dev::dispatch_pow2<1, kMaxIters>(ceil_div(ceil_div(cols, VEC), kClusterBlocks * kClusterThreads), fn);
}

// Whether this device runs softmax_cluster_kernel's sm_90 code: its binary, or the PTX the
// driver compiled, targets sm_90 or newer (every instantiation is built for the same
// arches, so one answers for all). Asked once per device.
bool cluster_kernel_runs() {
  static std::atomic<int> answer[64] = {};  // 0: not asked yet, 1: no, 2: yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) {
    (void)cudaGetLastError();
    return false;
  }
  if (answer[device].load() == 0) {
    cudaFuncAttributes attributes{};
    const bool runs = cudaFuncGetAttributes(&attributes, softmax_cluster_kernel<float, 1>) == cudaSuccess &&
                      attributes.binaryVersion >= 90 && attributes.ptxVersion >= 90;
    (void)cudaGetLastError();
    answer[device].store(runs ? 2 : 1);
  }
  return answer[device].load() == 2;
}

// Variant 4 where the device runs it; false (nothing launched) otherwise, or when the
// launch is refused (the online kernel then serves the call).
template <typename T>
bool launch_cluster(const SoftmaxArgs& a, cudaStream_t stream) {
  if (a.cols > kSoftmaxClusterMaxCols || !cluster_kernel_runs()) return false;
  // As in the online kernel, x and y share the vector path only if equally misaligned.
  if ((reinterpret_cast<uintptr_t>(a.x) - reinterpret_cast<uintptr_t>(a.y)) % 16 != 0) return false;
  const cudaError_t err = dispatch_cluster_iters<T>(a.cols, [&](auto iters) {
    constexpr auto kernel = softmax_cluster_kernel<T, decltype(iters)::value>;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(unsigned(std::min<int64_t>(a.rows, int64_t(1) << 16) * kClusterBlocks));
    config.blockDim = dim3(kClusterThreads);
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = kClusterBlocks;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, a);
  });
  if (err != cudaSuccess) (void)cudaGetLastError();  // refused: not a sticky error
  return err == cudaSuccess;
}

template <typename T, int VEC>
cudaError_t launch_regs(const SoftmaxArgs& a, cudaStream_t stream) {
  return dev::launch_row_kernel<T, VEC, kSoftmaxWarpMaxCols, kSoftmaxBlockMaxCols>(
      a.rows, a.cols, [&](auto iters, auto warp_per_row, dim3 grid, int threads) {
        softmax_regs_kernel<T, VEC, decltype(iters)::value, decltype(warp_per_row)::value>
            <<<grid, threads, 0, stream>>>(a);
      });
}

template <typename T>
cudaError_t launch_softmax(const SoftmaxArgs& a, cudaStream_t stream) {
  if (a.cols > kSoftmaxBlockMaxCols) {
    if (launch_cluster<T>(a, stream)) return cudaSuccess;
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

cudaError_t cross_entropy_forward(const CrossEntropyArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.cols <= 0) return cudaErrorInvalidValue;
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] {
    cross_entropy_kernel<T><<<dev::capped_grid(args.rows), kOnlineThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_backward(const CrossEntropyArgs& args, DType dtype, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.cols <= 0) return cudaErrorInvalidValue;
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] {
    cross_entropy_backward_kernel<T><<<dev::capped_grid(args.rows), kOnlineThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace gptext::kernels
