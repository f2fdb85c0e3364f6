// Fused attention, forward: out = softmax(scale q k^T) v without writing the scores out.
//
// One thread block owns a tile of BM = 16 x R x WARPS "rows" of one (batch, kv head): a row
// is a (query head of the group, query) pair, so grouped-query heads that share keys and
// values are served by one stream of them, and a decode step (q_len = 1) packs the group's
// heads into one tile. Each warp owns R tiles of 16 rows (AttentionPlan::warp_rows = 16 R):
// R = 1 for decode and small grids, R = 2 for prefill grids large enough to fill the GPU
// with 128-row blocks, where every K and V fragment read from shared memory feeds both row
// tiles' products. Per 64-key tile:
//   - K and V tiles stream through shared memory, double-buffered with cp.async; rows of
//     head_dim b16 elements are stored with an XOR swizzle of their 16-byte chunks
//     (swizzle_chunk) so the ldmatrix reads below are free of bank conflicts;
//   - S = Q K^T on tensor cores (mma.sync m16n8k16, fp32 accumulate), Q's fragments held in
//     registers for the whole block (re-read from shared memory per key tile when R = 2 at
//     D = 128, where the accumulators need the registers);
//   - the online softmax runs on S in registers: each thread holds two rows' elements per
//     row tile, the row max is reduced over the four threads of a quad with two shuffles,
//     the running sum is kept per thread and reduced once at the end; tiles wholly inside
//     every row's key range skip the masking, tiles wholly outside are never loaded
//     (causal / window skip);
//   - P is rounded to b16 straight from the accumulator registers into the A fragments of
//     P V (the C and A layouts of m16n8k16 line up, see mma.cuh), and V's fragments come
//     from ldmatrix.trans.
// mma.sync rather than nvcuda::wmma because the softmax must touch every accumulator in
// registers, which wmma's unspecified fragment layout forbids (it would cost a shared-memory
// round trip per tile, as gemm_wmma.cu's epilogue pays once); this is the reasoning, to be
// confirmed by measurement on a GPU.
//
// A sink (gpt-oss) starts each row's softmax as a virtual key with no value: max = sink,
// sum = 1. When the query tiles cannot fill the GPU (decode), each tile's keys are split
// over several blocks (split-KV); those write normalised fp32 partial outputs with their
// log-sum-exp and attention_combine_kernel merges them, adding the sink there.
//
// Per 64-key tile without a mask, counted in the sm_90 SASS (bf16, four warps), a warp
// issues for R = 1 ~490 instructions and 32 ldmatrix for its 64 mma.sync at D = 64 (~720 and
// 64 for 128 at D = 128); for R = 2, ~790 and 32 for 128 at D = 64 (~1200 and 80 for 256 at
// D = 128). The version before the loop rework had ~1800 (~2000) for R = 1.
//
// Unverified: bench/gpu_suite.sh verified this kernel on an H100 (sm_90) on 2026-11-23
// (commit 3a9f802), before its key loop was reworked (unrolled tile copies, masks only on
// edge tiles with 32-bit compares, .ftz exponentials, later row tiles first) and before the
// R = 2 form; neither has run on a GPU yet (test_kernels runs every case under both forms).
// The sm_80 build has never run on a GPU.
#include "attention_tiles.cuh"
#include "launch.h"

namespace gptext::kernels {
namespace {

using namespace dev;

constexpr int kBlockKeys = 64;
constexpr int kMaxSplits = 64;

template <int D, int WARPS, int R>
struct FwdTile {
  static constexpr int kWarpRows = 16 * R;  // a warp's rows: R tiles of 16 (AttentionPlan::warp_rows)
  static constexpr int BM = kWarpRows * WARPS, BN = kBlockKeys;
  static constexpr size_t kSmemBytes = size_t(BM + 4 * BN) * D * 2;  // Q, then K and V x 2 stages
  // Q's A fragments stay in registers for the whole block where they take at most 32 of
  // them (D * R <= 128); with two row tiles at D = 128 the accumulators need those
  // registers, and Q's fragments are read from shared memory again for every key tile.
  static constexpr bool kQInRegisters = D * R <= 128;
  // Blocks per SM the register allocation must allow (65536 registers / (threads x regs)):
  // at most ~168 registers a thread for D = 64 with 2 or 4 warps, 255 otherwise. Without
  // the cap ptxas keeps the unrolled tile copies' addresses live across the key loop (194
  // registers at D = 64: two 4-warp blocks an SM instead of three). Two row tiles a warp
  // (R = 2, four warps) ask for two blocks an SM: 255 registers.
  static constexpr int kMinBlocks = R == 2 ? 2 : (WARPS == 1 ? 8 : (D == 64 ? 12 : 8) / WARPS);
};

template <typename T, int D, int WARPS, int R>
__global__ void __launch_bounds__(WARPS * 32, FwdTile<D, WARPS, R>::kMinBlocks)
    attention_fwd_kernel(const AttentionArgs a, const AttentionPlan w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Tile = FwdTile<D, WARPS, R>;
  constexpr int BM = Tile::BM, BN = Tile::BN, THREADS = WARPS * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + BM * D;
  T* sv = sk + 2 * BN * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t group = a.heads / a.kv_heads, rows = group * a.q_len;
  const int64_t row_tiles = ceil_div(rows, BM);
  // Later row tiles first: under a causal mask they have the most keys, and a grid whose
  // longest blocks start first leaves a shorter tail of lone blocks at its end.
  const int64_t r0 = (row_tiles - 1 - blockIdx.x % row_tiles) * BM;
  const int split = int(blockIdx.x / row_tiles);
  const int64_t kv = blockIdx.y, b = blockIdx.z;

  // The queries this tile spans, and the key tiles this split streams.
  const int64_t r_last = (r0 + BM < rows ? r0 + BM : rows) - 1;
  const bool one_head = r0 / a.q_len == r_last / a.q_len;
  const int64_t t_lo = one_head ? r0 % a.q_len : 0, t_hi = one_head ? r_last % a.q_len : a.q_len - 1;
  const KeyRange span = attention_span_keys(a, b, t_lo, t_hi);
  const int64_t first_tile = span.begin / BN, end_tile = span.end > span.begin ? ceil_div(span.end, BN) : first_tile;
  const int64_t per_split = ceil_div(end_tile - first_tile, w.splits);
  const int64_t tile_begin = first_tile + split * per_split;
  const int64_t tile_end = tile_begin + per_split < end_tile ? tile_begin + per_split : end_tile;

  // This thread's rows: rows g and g + 8 (i = 0, 1) of each of its warp's R row tiles.
  int64_t head[R][2], query[R][2];
  KeyRange keys[R][2];
  bool valid[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t row = r0 + warp * Tile::kWarpRows + 16 * r + g + 8 * i;
      valid[r][i] = row < rows;
      head[r][i] = kv * group + (valid[r][i] ? row / a.q_len : 0);
      query[r][i] = valid[r][i] ? row % a.q_len : 0;
      keys[r][i] = valid[r][i] ? attention_row_keys(a, b, query[r][i]) : KeyRange{0, 0};
    }

  load_tile<D, THREADS>(sq, BM, a.q, [&](int row) -> const T* {
    const int64_t r = r0 + row;
    return r < rows ? row_ptr<T>(a.q, a.q_stride, b, kv * group + r / a.q_len, r % a.q_len) : nullptr;
  });
  cp_async_commit();
  // This (batch, kv head)'s keys and values: row `key` at base + key * stride.
  const T* k_rows = row_ptr<T>(a.k, a.k_stride, b, kv, 0);
  const T* v_rows = row_ptr<T>(a.v, a.v_stride, b, kv, 0);
  const KeyRange held = attention_batch_keys(a, b);
  auto load_kv = [&](int stage, int64_t tile) {
    load_rows<D, BN, THREADS>(sk + stage * BN * D, k_rows, a.k_stride[2], tile * BN, held.begin, held.end);
    load_rows<D, BN, THREADS>(sv + stage * BN * D, v_rows, a.v_stride[2], tile * BN, held.begin, held.end);
  };
  // The first and last queries' keys, to tell the tiles that need a mask (keys_unmasked).
  const KeyRange first_row_keys = attention_row_keys(a, b, t_lo), last_row_keys = attention_row_keys(a, b, t_hi);
  if (tile_begin < tile_end) load_kv(0, tile_begin);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (the first K/V tile may still be in flight)
  __syncthreads();

  // Q's A fragment of row tile r, k-step ks (16 columns): from registers or shared memory.
  constexpr int kQTiles = Tile::kQInRegisters ? R : 1, kQSteps = Tile::kQInRegisters ? D / 16 : 1;
  uint32_t qf[kQTiles][kQSteps][4];
  auto q_fragment = [&](uint32_t (&f)[4], int r, int ks) {
    const int row = warp * Tile::kWarpRows + 16 * r + (lane % 8) + ((lane / 8) % 2) * 8;
    ldmatrix_x4(f, tile_at<D>(sq, row, ks * 2 + lane / 16));
  };
  if constexpr (Tile::kQInRegisters) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) q_fragment(qf[r][ks], r, ks);
  }

  const bool finalize = w.splits == 1;  // else the combine step adds the sink and normalises
  float o[R][D / 8][4] = {};
  float m[R][2], l[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool sink = finalize && a.sinks != nullptr && valid[r][i];
      m[r][i] = sink ? a.sinks[head[r][i]] * kLog2e : -INFINITY;
      l[r][i] = sink && c == 0 ? 1.0f : 0.0f;  // the quad's partial sums are added at the end
    }
  const float k2 = a.scale * kLog2e;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = int(tile - tile_begin) & 1;
    if (tile + 1 < tile_end) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* ks_tile = sk + stage * BN * D;
    const T* vs_tile = sv + stage * BN * D;

    // S = Q K^T: each K fragment read from shared memory feeds the R row tiles.
    float s[R][BN / 8][4] = {};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qa[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (Tile::kQInRegisters) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[r][e] = qf[r][ks][e];
        } else {
          q_fragment(qa[r], r, ks);
        }
      }
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t kf[4];
        const int row = np * 16 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(kf, tile_at<D>(ks_tile, row, ks * 2 + (lane / 8) % 2));
#pragma unroll
        for (int r = 0; r < R; ++r) {
          mma_16816<T>(s[r][2 * np], qa[r], kf[0], kf[1]);
          mma_16816<T>(s[r][2 * np + 1], qa[r], kf[2], kf[3]);
        }
      }
    }

#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[r][nb][e] *= k2;
    const int64_t k0 = tile * BN;
    if (!keys_unmasked(first_row_keys, last_row_keys, k0, k0 + BN)) {  // block-uniform: edge tiles only
#pragma unroll
      for (int r = 0; r < R; ++r) mask_columns<BN>(s[r], keys[r], k0, -INFINITY);
    }

#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) tile_max = fmaxf(tile_max, fmaxf(s[r][nb][2 * i], s[r][nb][2 * i + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float m_new = fmaxf(m[r][i], tile_max);
        const float correction = softmax_exp(m[r][i], m_new, 1.0f);
        m[r][i] = m_new;
        l[r][i] *= correction;
#pragma unroll
        for (int db = 0; db < D / 8; ++db) {
          o[r][db][2 * i] *= correction;
          o[r][db][2 * i + 1] *= correction;
        }
        // softmax_exp(s, m_new) with its empty-row test made once per row: a row with
        // nothing visible yet (m_new = -inf) has only -inf scores, and 2^-inf = 0.
        const float m_sub = m_new == -INFINITY ? 0.0f : m_new;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int e = 2 * i; e < 2 * i + 2; ++e) {
            s[r][nb][e] = exp2_approx(s[r][nb][e] - m_sub);
            l[r][i] += s[r][nb][e];
          }
      }

    accumulate_row_tiles<T, D, BN / 8, R>(o, s, vs_tile);  // O += P V
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[r][i] += __shfl_xor_sync(0xffffffffu, l[r][i], 1);
      l[r][i] += __shfl_xor_sync(0xffffffffu, l[r][i], 2);
    }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!valid[r][i]) continue;
      const float inv = softmax_inv_sum(l[r][i]);
      const float lse = l[r][i] > 0.0f ? (m[r][i] + log2f(l[r][i])) / kLog2e : -INFINITY;
      const int64_t row = (b * a.heads + head[r][i]) * a.q_len + query[r][i];
      if (finalize) {
        T* out = static_cast<T*>(a.out) + b * a.out_stride[0] + head[r][i] * a.out_stride[1] +
                 query[r][i] * a.out_stride[2];
#pragma unroll
        for (int db = 0; db < D / 8; ++db)
          *reinterpret_cast<uint32_t*>(out + db * 8 + c * 2) =
              pack2<T>(o[r][db][2 * i] * inv, o[r][db][2 * i + 1] * inv);
        if (c == 0 && a.lse != nullptr) a.lse[row] = lse;
      } else {
        const int64_t part_row = int64_t(split) * a.batch * a.heads * a.q_len + row;
        float* out = w.out + part_row * D;
#pragma unroll
        for (int db = 0; db < D / 8; ++db)
          *reinterpret_cast<float2*>(out + db * 8 + c * 2) =
              make_float2(o[r][db][2 * i] * inv, o[r][db][2 * i + 1] * inv);
        if (c == 0) w.lse[part_row] = lse;
      }
    }
#else
  __trap();  // mma.sync bf16/fp16 and cp.async need sm_80+; the host never launches this
#endif
}

constexpr int kRowsPerBlock = 4;  // rows (warps) per block of the combine kernel

// Merges the split-KV partial results of one (batch, head, query) row per warp:
// lse = log(sum_s e^lse_s + e^sink), out = sum_s e^(lse_s - lse) out_s.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    attention_combine_kernel(const AttentionArgs a, const AttentionPlan w) {
  constexpr int PER_LANE = D / 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = a.batch * a.heads * a.q_len;
  if (row >= rows) return;
  const int64_t t = row % a.q_len, h = (row / a.q_len) % a.heads, b = row / (a.q_len * a.heads);
  const float sink = a.sinks != nullptr ? a.sinks[h] : -INFINITY;
  float m = sink;
  for (int s = 0; s < w.splits; ++s) m = fmaxf(m, w.lse[s * rows + row]);
  float total = softmax_exp(sink, m, kLog2e);  // log-sum-exps are natural logs
  float acc[PER_LANE] = {};
  for (int s = 0; s < w.splits; ++s) {
    const float weight = softmax_exp(w.lse[s * rows + row], m, kLog2e);
    total += weight;
    const float* part = w.out + (s * rows + row) * D;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[e] += weight * part[lane + 32 * e];
  }
  const float inv = softmax_inv_sum(total);
  T* out = static_cast<T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1] + t * a.out_stride[2];
#pragma unroll
  for (int e = 0; e < PER_LANE; ++e) out[lane + 32 * e] = from_float<T>(acc[e] * inv);
  if (lane == 0 && a.lse != nullptr) a.lse[row] = total > 0.0f ? m + logf(total) : -INFINITY;
}

// Warps per block: few rows (decode) get one warp, so that split-KV has more blocks to
// spread the keys over; prefill gets four. Two row tiles a warp always take four.
int warps_for(const AttentionArgs& a, int warp_rows) {
  const int64_t rows = a.heads / a.kv_heads * a.q_len;
  return warp_rows == 32 || rows > 32 ? 4 : (rows <= 16 ? 1 : 2);
}

int64_t row_tiles_for(const AttentionArgs& a, int block_rows) {
  return ceil_div(a.heads / a.kv_heads * a.q_len, block_rows);
}

template <typename T, int D, int WARPS, int R>
cudaError_t launch_fwd(const AttentionArgs& a, const AttentionPlan& w, cudaStream_t stream) {
  using Tile = FwdTile<D, WARPS, R>;
  constexpr auto kernel = attention_fwd_kernel<T, D, WARPS, R>;
  cudaError_t err = allow_dynamic_smem<kernel>(Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(row_tiles_for(a, Tile::BM) * w.splits), unsigned(a.kv_heads), unsigned(a.batch));
  kernel<<<grid, WARPS * 32, Tile::kSmemBytes, stream>>>(a, w);
  if ((err = cudaGetLastError()) != cudaSuccess || w.splits == 1) return err;
  const int64_t rows = a.batch * a.heads * a.q_len;
  attention_combine_kernel<T, D><<<unsigned(ceil_div(rows, kRowsPerBlock)), 32 * kRowsPerBlock, 0, stream>>>(a, w);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_fwd_dim(const AttentionArgs& a, const AttentionPlan& w, cudaStream_t stream) {
  if (w.warp_rows == 32) return launch_fwd<T, D, 4, 2>(a, w, stream);
  switch (warps_for(a, w.warp_rows)) {
    case 1:
      return launch_fwd<T, D, 1, 1>(a, w, stream);
    case 2:
      return launch_fwd<T, D, 2, 1>(a, w, stream);
    default:
      return launch_fwd<T, D, 4, 1>(a, w, stream);
  }
}

template <typename T>
cudaError_t launch_fwd_type(const AttentionArgs& a, const AttentionPlan& w, cudaStream_t stream) {
  return a.head_dim == 64 ? launch_fwd_dim<T, 64>(a, w, stream) : launch_fwd_dim<T, 128>(a, w, stream);
}

}  // namespace

bool attention_supported(const AttentionArgs& a, DType dtype) {
  // Query head h reads KV head h / (heads / kv_heads): the group must divide the heads.
  return dtype != DType::F32 && (a.head_dim == 64 || a.head_dim == 128) && a.kv_heads > 0 &&
         a.heads % a.kv_heads == 0;
}

AttentionPlan attention_forward_plan(const AttentionArgs& a, int sm_count, int64_t smem_per_sm, int warp_rows) {
  AttentionPlan plan{warp_rows == 32 ? 32 : 16, 1, nullptr, nullptr};
  if (a.batch == 0 || a.q_len == 0 || a.heads == 0 || a.kv_heads <= 0 || sm_count <= 0) return plan;
  const int64_t batch_heads = a.kv_heads * a.batch;
  // Two row tiles a warp where their 128-row blocks still give every SM two, and two
  // such blocks (with the 1 KB the runtime keeps per block) fit an SM's shared memory.
  const int64_t wide_blocks = row_tiles_for(a, 128) * batch_heads;
  const size_t wide_smem = a.head_dim == 64 ? FwdTile<64, 4, 2>::kSmemBytes : FwdTile<128, 4, 2>::kSmemBytes;
  if (warp_rows == 0 && wide_blocks >= 2 * int64_t(sm_count) && 2 * (int64_t(wide_smem) + 1024) <= smem_per_sm) {
    plan.warp_rows = 32;
  }
  const int warps = warps_for(a, plan.warp_rows);
  const int64_t blocks = row_tiles_for(a, warps * plan.warp_rows) * batch_heads;
  // Eight warps per SM: a one-warp decode block streams one key tile while it works on
  // the other, and one such warp per SM is far from keeping HBM busy.
  const int64_t target_blocks = int64_t(sm_count) * 8 / warps;
  plan.splits = attention_num_splits(blocks, ceil_div(a.k_len, kBlockKeys), target_blocks, kMaxSplits);
  return plan;
}

cudaError_t attention_forward(const AttentionArgs& args, DType dtype, const AttentionPlan& plan,
                              cudaStream_t stream) {
  if (!attention_supported(args, dtype) || args.batch > 65535 || args.kv_heads > 65535) return cudaErrorInvalidValue;
  if ((plan.warp_rows != 16 && plan.warp_rows != 32) || plan.splits < 1 || plan.splits > kMaxSplits ||
      (plan.splits > 1 && (plan.out == nullptr || plan.lse == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.q_len == 0 || args.heads == 0) return cudaSuccess;
  return dtype == DType::F16 ? launch_fwd_type<__half>(args, plan, stream)
                             : launch_fwd_type<__nv_bfloat16>(args, plan, stream);
}

}  // namespace gptext::kernels
