// Index math of the tiled GEMM (gemm_wmma.cu), kept host-callable so the native tests check
// it on any machine.
#pragma once

#include "common.cuh"

namespace gptext {

struct TileCoord {
  int64_t m;  // tile row
  int64_t n;  // tile column
};

// Grouped rasterisation: consecutive blocks walk down a band of `group_m` tile rows before
// moving to the next tile column, so the blocks resident at one time share A rows and B
// columns in L2 instead of sweeping all of B per row of tiles. A bijection from
// [0, tiles_m * tiles_n) onto the tile grid; the last band may be shorter.
GPTEXT_HD TileCoord gemm_tile_of_block(int64_t block, int64_t tiles_m, int64_t tiles_n, int64_t group_m) {
  const int64_t tiles_per_band = group_m * tiles_n;
  const int64_t band = block / tiles_per_band;
  const int64_t first_m = band * group_m;
  const int64_t band_rows = (tiles_m - first_m) < group_m ? (tiles_m - first_m) : group_m;
  const int64_t in_band = block % tiles_per_band;
  return {first_m + in_band % band_rows, in_band / band_rows};
}

// Bytes of a 16-byte chunk of row data that lie inside a row of `k` elements of `elem_size`
// bytes, starting at element `k0`: 16 for a full chunk, less at the tail, 0 past the end or
// outside the matrix. cp.async copies this many bytes and zero-fills the rest.
GPTEXT_HD int gemm_chunk_bytes(bool row_in_bounds, int64_t k0, int64_t k, int elem_size) {
  if (!row_in_bounds || k0 >= k) return 0;
  const int64_t bytes = (k - k0) * elem_size;
  return bytes >= 16 ? 16 : int(bytes);
}

// The block tiles of the WMMA GEMM (gemm_wmma.cu), block rows x block columns, warps as
// warp tiles of rows x columns:
//   Small  64 x 64,   4 warps of 32 x 32: problems with too few larger tiles to fill the GPU;
//   Large 128 x 128,  8 warps of 64 x 32;
//   Wide  128 x 256,  8 warps of 64 x 64: twice the multiply-adds per fragment loaded from
//         shared memory of Large's warp tiles, one block an SM (its accumulators take 128
//         registers a thread).
enum class GemmTile : int { Small = 0, Large = 1, Wide = 2 };
constexpr int kGemmTiles = 3;

struct GemmTileShape {
  int rows, cols;
};
GPTEXT_HD constexpr GemmTileShape gemm_tile_shape(GemmTile tile) {
  return tile == GemmTile::Small ? GemmTileShape{64, 64}
                                 : (tile == GemmTile::Large ? GemmTileShape{128, 128} : GemmTileShape{128, 256});
}

GPTEXT_HD int64_t gemm_tile_count(GemmTile tile, int64_t m, int64_t n) {
  const GemmTileShape s = gemm_tile_shape(tile);
  return ceil_div(m, s.rows) * ceil_div(n, s.cols);
}

// The tile an unmeasured call uses: Large when its tiles cover every SM at least once, else
// Small, so that small problems (decode, narrow layers) still spread over the GPU. Wide is
// picked only by measurement (linear's GEMM policy times the tiles per shape class).
GPTEXT_HD GemmTile gemm_default_tile(int64_t m, int64_t n, int sm_count) {
  return gemm_tile_count(GemmTile::Large, m, n) >= sm_count ? GemmTile::Large : GemmTile::Small;
}

// The grouped GEMM of a mixture of experts (expert_linear_grouped): routes sorted by bucket
// (an expert, or the last bucket for indices out of range), bucket b's routes at positions
// [offsets[b], offsets[b + 1]) of the sorted order. Each bucket gets ceil(count / tile_rows)
// row tiles, in bucket order; grouped_tile(t) says which bucket row tile t covers and its
// first row within the bucket (bucket == buckets: t is past the last tile). The grid is
// sized without reading the offsets: grouped_tiles_bound() tiles can never be too few.
struct GroupTile {
  int64_t bucket;
  int64_t begin;  // the bucket's first position in the sorted order
  int64_t count;  // the bucket's routes
  int64_t row0;   // the tile's first row within the bucket
};

GPTEXT_HD GroupTile grouped_tile(const int64_t* offsets, int64_t buckets, int64_t tile_rows, int64_t t) {
  int64_t first = 0;  // the first tile of bucket b
  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t count = offsets[b + 1] - offsets[b];
    const int64_t tiles = ceil_div(count, tile_rows);
    if (t < first + tiles) return {b, offsets[b], count, (t - first) * tile_rows};
    first += tiles;
  }
  return {buckets, 0, 0, 0};
}

GPTEXT_HD int64_t grouped_tiles_bound(int64_t routes, int64_t buckets, int64_t tile_rows) {
  return ceil_div(routes, tile_rows) + buckets;  // each bucket wastes at most one partial tile
}

}  // namespace gptext
