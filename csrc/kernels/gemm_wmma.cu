// Tiled GEMM on Tensor Cores with nvcuda::wmma, and a fused epilogue:
//   c[M, N] = act(a[M, K] @ b[N, K]^T + bias) + residual
// a is an activation matrix and b a PyTorch Linear weight ([out, in]); both are K-contiguous,
// so both tiles are loaded the same way: rows of BK elements.
//
// Structure (one thread block per BM x BN tile of c):
//   - a STAGES-deep cp.async pipeline (sm_80+) streams BM x BK and BN x BK tiles into
//     shared memory while the warps compute on an earlier stage; copies past the matrix
//     edge zero-fill, so any M, N, K works without a separate tail kernel;
//   - shared-memory rows are padded from BK to BK + 8 elements (80 bytes for BK = 32):
//     consecutive rows start 20 banks apart, so the 8-row ldmatrix phases that wmma's
//     loads issue touch 8 distinct 4-bank groups (no conflicts), and every fragment start
//     stays 32-byte aligned as wmma requires;
//   - each warp owns a WM x WN sub-tile as (WM/16) x (WN/16) 16x16 fp32 accumulators;
//   - the epilogue passes each accumulator through a 16x16 patch of shared memory
//     (store_matrix_sync), because wmma does not define which thread holds which
//     element; each lane then finishes 8 consecutive outputs of one row (bias, activation,
//     residual, rounding) and writes them as one 16-byte store when aligned. The patch
//     costs one shared-memory round trip per accumulator, small next to the K loop, and
//     keeps the epilogue independent of fragment layouts.
//   - blocks are rasterised in bands of kGroupM tile rows (gemm_tiles.cuh) for L2 reuse.
// The same kernel serves a mixture of experts' grouped products (kGrouped, GroupedRows): the
// routes sorted by expert on the device, each block a tile of one expert's routes, their
// rows of x gathered through the order as the tiles are copied (cp.async takes any row
// address), that expert's matrix as b, and each output row written to its route's place
// (with the SwiGLU of column pairs optionally fused). The grid is an upper bound on the
// tiles, so no group size is read back to the host and the call can be graph-captured.
// Three tile shapes (GemmTile in gemm_tiles.cuh): 64x64 (4 warps of 32x32), 128x128
// (8 warps of 64x32) and 128x256 (8 warps of 64x64). The caller picks one; linear's GEMM
// policy measures them per shape class.
// K rows whose start is not 16-byte aligned (K % 8 != 0) cannot use cp.async; they take
// the same pipeline with plain predicated loads.
//
// Unverified: bench/gpu_suite.sh verified this kernel on an H100 (sm_90) on 2026-11-23
// (commit 3a9f802), before the K loop's copies were precomputed per thread (AsyncTileCopy:
// ~150 instructions a warp per K step of the 128x128 tile, from ~770 in the sm_90 SASS),
// bf16 fragments were loaded with wmma.load's .shared form and the 128x256 tile was added;
// that version has not run on a GPU yet, nor has the grouped form. The sm_80 build has never
// run on a GPU.
#include <mma.h>

#include "gemm_tiles.cuh"
#include "launch.h"
#include "mma.cuh"

namespace gptext::kernels {
namespace {

using namespace nvcuda;
using dev::cp_async_16;
using dev::cp_async_commit;
using dev::cp_async_wait;

constexpr int kGroupM = 8;

template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_, int MIN_BLOCKS_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int kMinBlocksPerSM = MIN_BLOCKS_;  // caps registers so blocks co-reside
  static constexpr int kWarpsN = BN / WN;
  static constexpr int kWarps = (BM / WM) * kWarpsN;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kFragsM = WM / 16, kFragsN = WN / 16;
  static constexpr int kStride = BK + 8;  // padded shared-memory row, in elements
  static constexpr int kStageElems = (BM + BN) * kStride;
  static constexpr size_t kSmemBytes = size_t(STAGES) * kStageElems * 2;
  // The epilogue reuses the pipeline's memory: one 16x16 fp32 patch per warp.
  static_assert(kSmemBytes >= size_t(kWarps) * 16 * 16 * sizeof(float), "epilogue patch must fit");
  // Every sm_80+ GPU must take the block: sm_86 and sm_89 allow at most 99 KB of shared memory.
  static_assert(kSmemBytes <= 99 * 1024, "shared memory beyond what sm_86/sm_89 allow a block");
  static_assert(BK % 16 == 0 && WM % 16 == 0 && WN % 16 == 0, "wmma tiles are 16x16x16");
};
using SmallTile = TileConfig<64, 64, 32, 32, 32, 4, 4>;
using LargeTile = TileConfig<128, 128, 32, 64, 32, 4, 2>;
using WideTile = TileConfig<128, 256, 32, 64, 64, 3, 1>;  // 3 stages: 90 KB

// The host's view of the tiles (gemm_tile_shape: tile counts, the default choice) must be
// these configurations.
template <typename Cfg>
constexpr bool same_shape(GemmTile tile) {
  return gemm_tile_shape(tile).rows == Cfg::BM && gemm_tile_shape(tile).cols == Cfg::BN;
}
static_assert(same_shape<SmallTile>(GemmTile::Small) && same_shape<LargeTile>(GemmTile::Large) &&
                  same_shape<WideTile>(GemmTile::Wide),
              "gemm_tile_shape and the TileConfigs disagree");

// Fragment loads from shared memory. For fp16, wmma::load_matrix_sync. For bf16 it emits
// the generic-address form of wmma.load (nvcc 13.0 infers the .shared state space for f16
// only), which ptxas turns into generic LD instructions instead of ldmatrix: 48 LD.E per
// K step of the 128x128 tile where fp16 has 12 LDSM. The same PTX instruction with .shared
// fills the fragment's registers exactly as load_matrix_sync would.
template <typename Frag, typename T>
__device__ __forceinline__ void load_fragment(Frag& f, const T* smem, unsigned ldm) {
  wmma::load_matrix_sync(f, smem, ldm);
}
__device__ __forceinline__ void load_fragment(wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>& f,
                                              const __nv_bfloat16* smem, unsigned ldm) {
  static_assert(sizeof(f.x) == 4 * sizeof(uint32_t), "a bf16 m16n16k16 fragment is four 32-bit registers");
  uint32_t* r = reinterpret_cast<uint32_t*>(f.x);
  asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(dev::smem_address(smem)), "r"(ldm)
               : "memory");
}
__device__ __forceinline__ void load_fragment(wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>& f,
                                              const __nv_bfloat16* smem, unsigned ldm) {
  static_assert(sizeof(f.x) == 4 * sizeof(uint32_t), "a bf16 m16n16k16 fragment is four 32-bit registers");
  uint32_t* r = reinterpret_cast<uint32_t*>(f.x);
  asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(dev::smem_address(smem)), "r"(ldm)
               : "memory");
}

// Copies rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a K-contiguous matrix into
// shared memory with plain predicated loads, zero-filling outside the matrix: the path of
// rows not 16-byte aligned, which cp.async (AsyncTileCopy) cannot copy. row(r) is the start
// of row r (rows < rows_total): the dense matrix's, or a gathered one's.
template <typename T, typename Cfg, int ROWS, typename RowPtr>
__device__ __forceinline__ void load_tile(T* smem, const RowPtr& row, int64_t rows_total, int64_t row0,
                                          int64_t k0, int64_t k) {
  constexpr int kChunksPerRow = Cfg::BK / 8;
  for (int c = threadIdx.x; c < ROWS * kChunksPerRow; c += Cfg::kThreads) {
    const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * 8;
    const int64_t gr = row0 + r, gk = k0 + kc;
    T* dst = smem + r * Cfg::kStride + kc;
#pragma unroll
    for (int e = 0; e < 8; ++e)
      dst[e] = (gr < rows_total && gk + e < k) ? row(gr)[gk + e] : dev::from_float<T>(0.0f);
  }
}

// The cp.async copies of one thread for one matrix, set up once per block: the thread
// copies the same 16-byte chunk (columns kc..kc+7 of each BK-wide K tile) of kPerThread
// rows, kRowStep apart, so per K tile it only advances its pointers by BK and tests the
// K tail, instead of recomputing every address from (row, chunk) indices.
template <typename T, typename Cfg, int ROWS>
struct AsyncTileCopy {
  static constexpr int kChunksPerRow = Cfg::BK / 8, kRowStep = Cfg::kThreads / kChunksPerRow;
  static constexpr int kPerThread = ROWS / kRowStep;
  static_assert(Cfg::kThreads % kChunksPerRow == 0 && ROWS % kRowStep == 0, "whole rows per step");
  const T* row_start[kPerThread];  // this thread's chunk of each row at K = 0; nullptr outside the matrix
  int smem_offset;                 // of the first row's chunk within a tile, in elements
  int kc;

  template <typename RowPtr>
  __device__ __forceinline__ AsyncTileCopy(const RowPtr& row, int64_t rows_total, int64_t row0) {
    kc = (threadIdx.x % kChunksPerRow) * 8;
    const int r = threadIdx.x / kChunksPerRow;
    smem_offset = r * Cfg::kStride + kc;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t gr = row0 + r + i * kRowStep;
      row_start[i] = gr < rows_total ? row(gr) + kc : nullptr;
    }
  }

  // Issues the copies of K tile [k0, k0 + BK) into `smem` (a tile of ROWS padded rows).
  __device__ __forceinline__ void copy(T* smem, const T* any_global, int64_t k0, int64_t k) const {
    const int bytes = gemm_chunk_bytes(true, k0 + kc, k, int(sizeof(T)));
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const bool inside = row_start[i] != nullptr && bytes > 0;
      dev::cp_async_16(smem + smem_offset + i * kRowStep * Cfg::kStride, inside ? row_start[i] + k0 : any_global,
                       inside ? bytes : 0);
    }
  }
};

// The grouped form's rows (kGrouped): a mixture of experts' routes, sorted by expert
// (grouped_tile in gemm_tiles.cuh). A block's rows are routes order[begin + row0 ...] of one
// expert e: it reads x's row of each route's token (gathered through the order), expert
// e's matrix b + e * n * ldb and bias + e * n, and writes each route's own output row of c.
// Bucket `experts` holds the routes whose index is out of range: their rows become NaN.
struct GroupedRows {
  const int64_t* order;    // (routes,): route ids sorted by bucket
  const int64_t* offsets;  // (experts + 2,): bucket b at order[offsets[b] .. offsets[b + 1])
  int64_t experts;
  int64_t routes;
  int64_t slots;           // route r reads x row r / slots (or r with x_per_route)
  bool x_per_route;
  bool swiglu;             // c's rows hold n / 2 columns: swiglu_clamped of each column pair
  float limit;
};

template <typename T, typename Cfg, bool kAsync, bool kGrouped>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocksPerSM)
    gemm_wmma_kernel(const GemmArgs a, const GroupedRows g, int64_t tiles_m, int64_t tiles_n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const T* A = static_cast<const T*>(a.a);
  const T* B = static_cast<const T*>(a.b);
  T* C = static_cast<T*>(a.c);
  const T* bias = static_cast<const T*>(a.bias);

  const TileCoord tile = gemm_tile_of_block(blockIdx.x, tiles_m, tiles_n, kGroupM);
  int64_t m0 = tile.m * Cfg::BM, rows_total = a.m;
  const int64_t n0 = tile.n * Cfg::BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t* routes = nullptr;  // grouped: the block's expert's routes, in sorted order
  if constexpr (kGrouped) {
    const GroupTile group = grouped_tile(g.offsets, g.experts + 1, Cfg::BM, tile.m);
    if (group.bucket > g.experts) return;  // past the last tile (the grid is an upper bound)
    routes = g.order + group.begin;
    rows_total = group.count;
    m0 = group.row0;
    if (group.bucket == g.experts) {  // indices out of range: NaN rows, as expert_linear_forward writes
      const int64_t c_begin = g.swiglu ? n0 / 2 : n0, c_end = g.swiglu ? (n0 + Cfg::BN) / 2 : n0 + Cfg::BN;
      const int64_t cols = (c_end < a.ldc ? c_end : a.ldc) - c_begin;
      const int64_t rows = rows_total - m0 < Cfg::BM ? rows_total - m0 : Cfg::BM;
      for (int64_t i = threadIdx.x; i < rows * cols; i += Cfg::kThreads)
        C[routes[m0 + i / cols] * a.ldc + c_begin + i % cols] = dev::from_float<T>(__int_as_float(0x7fc00000));
      return;
    }
    B += group.bucket * a.n * a.ldb;
    if (bias != nullptr) bias += group.bucket * a.n;
  }
  // Row r of this block's A operand: the dense matrix's row, or the route's token's row.
  const auto a_row = [&](int64_t r) -> const T* {
    if constexpr (kGrouped) {
      const int64_t route = routes[r];
      return A + (g.x_per_route ? route : route / g.slots) * a.lda;
    } else {
      return A + r * a.lda;
    }
  };
  const auto b_row = [&](int64_t r) -> const T* { return B + r * a.ldb; };
  const int warp_m = warp / Cfg::kWarpsN, warp_n = warp % Cfg::kWarpsN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Cfg::kFragsM][Cfg::kFragsN];
#pragma unroll
  for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const AsyncTileCopy<T, Cfg, Cfg::BM> copy_a(a_row, rows_total, m0);
  const AsyncTileCopy<T, Cfg, Cfg::BN> copy_b(b_row, a.n, n0);
  auto load_stage = [&](int stage, int64_t k_tile) {
    T* stage_smem = smem + stage * Cfg::kStageElems;
    const int64_t k0 = k_tile * Cfg::BK;
    if constexpr (kAsync) {
      copy_a.copy(stage_smem, A, k0, a.k);
      copy_b.copy(stage_smem + Cfg::BM * Cfg::kStride, B, k0, a.k);
    } else {
      load_tile<T, Cfg, Cfg::BM>(stage_smem, a_row, rows_total, m0, k0, a.k);
      load_tile<T, Cfg, Cfg::BN>(stage_smem + Cfg::BM * Cfg::kStride, b_row, a.n, n0, k0, a.k);
    }
  };

  const int64_t k_tiles = ceil_div(a.k, Cfg::BK);
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();  // stage kt has landed for every thread, and stage kt - 1 is free
    const int64_t next = kt + Cfg::STAGES - 1;
    if (next < k_tiles) load_stage(int(next % Cfg::STAGES), next);
    cp_async_commit();

    const T* As = smem + int(kt % Cfg::STAGES) * Cfg::kStageElems;
    const T* Bs = As + Cfg::BM * Cfg::kStride;
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[Cfg::kFragsM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf[Cfg::kFragsN];
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i)
        load_fragment(af[i], As + (warp_m * Cfg::WM + i * 16) * Cfg::kStride + kk, Cfg::kStride);
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j)
        load_fragment(bf[j], Bs + (warp_n * Cfg::WN + j * 16) * Cfg::kStride + kk, Cfg::kStride);
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kFragsN; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the epilogue's patches

  float* patch = reinterpret_cast<float*>(smem_raw) + warp * 256;
  const T* residual = static_cast<const T*>(a.residual);  // none in the grouped form
  const bool vector_store = a.ldc % 8 == 0 && dev::is_aligned(C, 16) && dev::is_aligned(residual, 16);
  const int r = lane / 2, c0 = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j) {
      wmma::store_matrix_sync(patch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t gm = m0 + warp_m * Cfg::WM + i * 16 + r;
      const int64_t gn = n0 + warp_n * Cfg::WN + j * 16 + c0;
      if (kGrouped && g.swiglu && gm < rows_total && gn < a.n) {
        // Each lane's 8 columns start at a multiple of 8: whole (gate, linear) pairs. The
        // products are rounded to the storage type first, as expert_linear's are.
        T* c_row = C + routes[gm] * a.ldc + gn / 2;
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          if (gn + e < a.n) {
            const float b_gate = bias != nullptr ? dev::to_float(bias[gn + e]) : 0.0f;
            const float b_linear = bias != nullptr ? dev::to_float(bias[gn + e + 1]) : 0.0f;
            const float gate = dev::round_to<T>(patch[r * 16 + c0 + e] + b_gate);
            const float linear = dev::round_to<T>(patch[r * 16 + c0 + e + 1] + b_linear);
            c_row[e / 2] = dev::from_float<T>(swiglu_clamped(gate, linear, g.limit));
          }
        }
      } else if (gm < rows_total && gn < a.n) {
        T* c_row = kGrouped ? C + routes[gm] * a.ldc : C + gm * a.ldc;
        const bool full = vector_store && gn + 8 <= a.n;
        float res[8] = {};
        if (residual != nullptr) {
          if (full) {
            dev::load_floats<8>(residual + gm * a.ldc + gn, res);
          } else {
            for (int e = 0; e < 8 && gn + e < a.n; ++e) res[e] = dev::to_float(residual[gm * a.ldc + gn + e]);
          }
        }
        float out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float b = (bias != nullptr && gn + e < a.n) ? dev::to_float(bias[gn + e]) : 0.0f;
          out[e] = linear_epilogue(patch[r * 16 + c0 + e], b, a.act, res[e]);
        }
        if (full) {
          dev::store_floats<8>(c_row + gn, out);
        } else {
          for (int e = 0; e < 8 && gn + e < a.n; ++e) c_row[gn + e] = dev::from_float<T>(out[e]);
        }
      }
      __syncwarp();
    }
#else
  __trap();  // Tensor Core bf16/fp16 WMMA with cp.async needs sm_80+; the host never launches this
#endif
}

template <typename T, typename Cfg, bool kAsync, bool kGrouped>
cudaError_t launch_tile(const GemmArgs& a, const GroupedRows& g, cudaStream_t stream) {
  constexpr auto kernel = gemm_wmma_kernel<T, Cfg, kAsync, kGrouped>;
  const cudaError_t err = dev::allow_dynamic_smem<kernel>(Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles_m = kGrouped ? grouped_tiles_bound(g.routes, g.experts + 1, Cfg::BM) : ceil_div(a.m, Cfg::BM);
  const int64_t tiles_n = ceil_div(a.n, Cfg::BN);
  if (tiles_m * tiles_n > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  kernel<<<unsigned(tiles_m * tiles_n), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(a, g, tiles_m, tiles_n);
  return cudaGetLastError();
}

// Row starts 16 bytes apart (lda, ldb multiples of 8 elements; aligned bases) allow cp.async.
template <typename T, typename Cfg, bool kGrouped>
cudaError_t launch_config(const GemmArgs& a, const GroupedRows& g, cudaStream_t stream) {
  const bool async = a.lda % 8 == 0 && a.ldb % 8 == 0 && dev::is_aligned(a.a, 16) && dev::is_aligned(a.b, 16);
  return async ? launch_tile<T, Cfg, true, kGrouped>(a, g, stream) : launch_tile<T, Cfg, false, kGrouped>(a, g, stream);
}

template <typename T, bool kGrouped = false>
cudaError_t launch_gemm(const GemmArgs& a, GemmTile tile, cudaStream_t stream, const GroupedRows& g = {}) {
  switch (tile) {
    case GemmTile::Small:
      return launch_config<T, SmallTile, kGrouped>(a, g, stream);
    case GemmTile::Large:
      return launch_config<T, LargeTile, kGrouped>(a, g, stream);
    case GemmTile::Wide:
      // The grouped form takes Small or Large only (expert_linear_grouped): no Wide kernels built for it.
      if constexpr (!kGrouped) return launch_config<T, WideTile, false>(a, g, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t gemm_wmma(const GemmArgs& args, DType dtype, GemmTile tile, cudaStream_t stream) {
  // K == 0 needs no special case: the K loop runs zero times and the epilogue sees zeros.
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16:
      return launch_gemm<__half>(args, tile, stream);
    case DType::BF16:
      return launch_gemm<__nv_bfloat16>(args, tile, stream);
    default:
      return cudaErrorInvalidDeviceFunction;  // fp32 goes through cuBLAS (see cuda_ops.cpp)
  }
}

cudaError_t expert_linear_grouped(const ExpertArgs& args, const int64_t* order, const int64_t* offsets, DType dtype,
                                  cudaStream_t stream) {
  const int64_t routes = args.tokens * args.slots;
  if (routes == 0 || args.n == 0) return cudaSuccess;
  if (args.num_experts <= 0 || args.k < 0 || (args.swiglu && args.n % 2 != 0) || order == nullptr ||
      offsets == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t out_cols = args.swiglu ? args.n / 2 : args.n;
  const GemmArgs a{args.x, args.weight, args.out, args.bias, nullptr, routes, args.n, args.k, args.k, args.k,
                   out_cols, Activation::None};
  const GroupedRows g{order, offsets, args.num_experts, routes, args.slots, args.x_per_route, args.swiglu, args.limit};
  // Large tiles once the experts average a full tile of routes; below that most of a large
  // tile's rows would be padding.
  const GemmTile tile = routes >= 128 * args.num_experts ? GemmTile::Large : GemmTile::Small;
  switch (dtype) {
    case DType::F16:
      return launch_gemm<__half, true>(a, tile, stream, g);
    case DType::BF16:
      return launch_gemm<__nv_bfloat16, true>(a, tile, stream, g);
    default:
      return cudaErrorInvalidDeviceFunction;  // fp32 stays on expert_linear_forward (see cuda_ops.cpp)
  }
}

}  // namespace gptext::kernels
