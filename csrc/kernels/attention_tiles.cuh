// Shared-memory tiles of the fused attention kernels (attention_fwd.cu, attention_bwd.cu),
// and the two warp-level tile products they are built from. Tiles are rows of D b16
// elements, their 16-byte chunks XOR-swizzled (swizzle_chunk) so that the eight rows an
// ldmatrix phase reads sit in eight different bank groups.
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

// Copies rows [row0, row0 + ROWS) of a matrix of D-element rows (row r at base + r * stride)
// into a swizzled shared tile with cp.async, zero-filling the rows outside [begin, end): past
// the matrix's end, or keys a batch does not hold, which are never read, so that whatever
// lies there cannot reach a product as 0 * NaN. Each thread copies the same 16-byte chunk of
// every (THREADS / CHUNKS)-th row, so the loop unrolls and the swizzled column is the same in
// every step: per row, one address and one bound check.
template <int D, int ROWS, int THREADS, typename T>
__device__ __forceinline__ void load_rows(T* tile, const T* base, int64_t stride, int64_t row0, int64_t begin,
                                          int64_t end) {
  constexpr int CHUNKS = D / 8, STEP = THREADS / CHUNKS;
  static_assert(THREADS % CHUNKS == 0 && ROWS % STEP == 0, "every thread copies whole steps");
  const int chunk = threadIdx.x % CHUNKS, first = threadIdx.x / CHUNKS;
  const T* src = base + (row0 + first) * stride + chunk * 8;
  // Tile row `row` is copied iff 0 <= row - lo < count (one unsigned compare).
  const int64_t lo = begin - row0, count = end > begin ? end - begin : 0;
#pragma unroll
  for (int i = 0; i < ROWS / STEP; ++i, src += STEP * stride) {
    const bool inside = uint64_t(first + i * STEP - lo) < uint64_t(count);
    dev::cp_async_16(tile_at<D>(tile, first + i * STEP, chunk), inside ? src : base, inside ? 16 : 0);
  }
}

// The masking of a partial tile of COLS columns from col0: sets the elements of this
// thread's two accumulator rows (e / 2 = 0, 1) outside their visible ranges to `fill`; the
// thread holds columns nb * 8 + 2c + (e & 1), c its place in its quad.
template <int COLS>
__device__ __forceinline__ void mask_columns(float (&acc)[COLS / 8][4], const KeyRange (&visible)[2], int64_t col0,
                                             float fill) {
  const int c = threadIdx.x % 4;
  const ColumnRange cols[2] = {tile_columns(visible[0], col0, COLS), tile_columns(visible[1], col0, COLS)};
#pragma unroll
  for (int nb = 0; nb < COLS / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nb * 8 + c * 2 + (e & 1);
      if ((col < cols[e / 2].lo) | (col >= cols[e / 2].hi)) acc[nb][e] = fill;
    }
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const int64_t (&stride)[3], int64_t b, int64_t h,
                                            int64_t t) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + t * stride[2];
}

// S (16 rows x 8 * NB columns of this warp) = A-rows x B-rows^T over D: A's fragments come
// from `a_tile` rows [a_row0, a_row0 + 16), B's from `b_tile` rows [0, 8 * NB).
template <typename T, int D, int NB>
__device__ __forceinline__ void rows_times_rows_t(float (&s)[NB][4], const T* a_tile, int a_row0, const T* b_tile) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t af[4];
    dev::ldmatrix_x4(af, tile_at<D>(a_tile, a_row0 + (lane % 8) + ((lane / 8) % 2) * 8, ks * 2 + lane / 16));
#pragma unroll
    for (int np = 0; np < NB / 2; ++np) {
      uint32_t bf[4];
      dev::ldmatrix_x4(bf, tile_at<D>(b_tile, np * 16 + (lane % 8) + (lane / 16) * 8, ks * 2 + (lane / 8) % 2));
      dev::mma_16816<T>(s[2 * np], af, bf[0], bf[1]);
      dev::mma_16816<T>(s[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (R tiles of 16 rows x D) += P (R x 16 x 8 * NB, accumulator layout) x B, B's rows
// [0, 8 * NB) of D columns read from `b_tile` with ldmatrix.trans. Each B fragment read
// from shared memory feeds the R row tiles' products.
template <typename T, int D, int NB, int R>
__device__ __forceinline__ void accumulate_row_tiles(float (&acc)[R][D / 8][4], const float (&p)[R][NB][4],
                                                     const T* b_tile) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    uint32_t pa[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) dev::c_pair_to_a<T>(pa[r], p[r][2 * kk], p[r][2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bf[4];
      dev::ldmatrix_x4_trans(bf, tile_at<D>(b_tile, kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + lane / 16));
#pragma unroll
      for (int r = 0; r < R; ++r) {
        dev::mma_16816<T>(acc[r][2 * dp], pa[r], bf[0], bf[1]);
        dev::mma_16816<T>(acc[r][2 * dp + 1], pa[r], bf[2], bf[3]);
      }
    }
  }
}

// The same for one row tile: acc (16 rows x D) += P (16 x 8 * NB) x B.
template <typename T, int D, int NB>
__device__ __forceinline__ void accumulate_times_rows(float (&acc)[D / 8][4], const float (&p)[NB][4],
                                                      const T* b_tile) {
  accumulate_row_tiles<T, D, NB, 1>(reinterpret_cast<float (&)[1][D / 8][4]>(acc),
                                    reinterpret_cast<const float (&)[1][NB][4]>(p), b_tile);
}

}  // namespace gptext::kernels
