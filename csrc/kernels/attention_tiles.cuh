// Shared-memory tiles of the fused attention kernels (attention_fwd.cu, attention_bwd.cu):
// rows of D b16 elements, their 16-byte chunks XOR-swizzled (swizzle_chunk) so that the
// eight rows an ldmatrix phase reads sit in eight different bank groups.
#pragma once

#include "attention_math.cuh"
#include "mma.cuh"

namespace gptext::kernels {

// Address of logical element (row, chunk * 8) of a swizzled tile with D columns.
template <int D, typename T>
__device__ __forceinline__ T* tile_at(T* tile, int row, int chunk) {
  return tile + row * D + swizzle_chunk(row, chunk) * 8;
}

// Copies `rows` rows of D elements into a swizzled shared tile with cp.async, zero-filling
// invalid rows. row_src(r) returns the global address of row r, or nullptr when it doesn't
// exist; `any_global` is a valid global address to name in the zero-byte copies.
template <int D, int THREADS, typename T, typename RowSrc>
__device__ __forceinline__ void load_tile(T* tile, int rows, const void* any_global, RowSrc&& row_src) {
  constexpr int CHUNKS = D / 8;
  for (int idx = threadIdx.x; idx < rows * CHUNKS; idx += THREADS) {
    const int row = idx / CHUNKS, chunk = idx % CHUNKS;
    const T* src = row_src(row);
    dev::cp_async_16(tile_at<D>(tile, row, chunk), src != nullptr ? src + chunk * 8 : any_global,
                     src != nullptr ? 16 : 0);
  }
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const int64_t (&stride)[3], int64_t b, int64_t h,
                                            int64_t t) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + t * stride[2];
}

}  // namespace gptext::kernels
