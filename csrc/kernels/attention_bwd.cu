// Fused attention, backward: dQ, dK, dV from the saved log-sum-exp, recomputing the
// probabilities tile by tile instead of storing them:
//   p = exp(scale q.k - lse),  dp = grad_out . v,  ds = p (dp - delta),
//   dv = sum_q p grad_out,  dk = scale sum_q ds q,  dq = scale sum_k ds k,
// with delta = rowsum(grad_out * out) computed beforehand (cuda_ops.cpp).
//
// Two kernels, so that every gradient has exactly one writer and needs no atomics:
//   - attention_dkdv_kernel: a block owns 64 keys of one (batch, kv head) and walks the
//     queries of every head of its group that can see them, 32 at a time. It works "key
//     major": S^T = K Q^T, so P^T and dS^T come out of the accumulators already in the A
//     layout that dV += P^T dO and dK += dS^T Q consume (see mma.cuh), and dO / Q enter as
//     B operands through ldmatrix (plain for the K Q^T and V dO^T products, .trans for the
//     P^T dO and dS^T Q ones).
//   - attention_dq_kernel: a block owns 64 queries of one head and walks their keys, 32 at a
//     time, the forward's orientation: S = Q K^T, dP = dO V^T, dQ += dS K.
// The probabilities are recomputed in both (twice the forward's QK^T work), the price of no
// atomics and of a simple, deterministic result.
//
// Each kernel streams its 32-row tiles through two shared-memory stages: the next tile's
// cp.async copies (with, for dK/dV, its queries' log-sum-exp and delta) are in flight while
// the warps compute on the current one.
//
// Unverified: bench/gpu_suite.sh verified these kernels on an H100 (sm_90) on 2026-11-23
// (commit 3a9f802), before their loops were reworked (unrolled tile copies, masks only on
// edge tiles from per-thread ranges, .ftz exponentials: ~415 / ~725 instructions a warp per
// step at D = 64 for dQ / dK dV, from ~2000 / ~2400 in the sm_90 SASS) and before the
// streamed tiles were double-buffered (one stage, copied and waited for at every step); the
// reworked loops have not run on a GPU yet. The sm_80 build has never run on a GPU.
#include "attention_tiles.cuh"
#include "launch.h"

namespace gptext::kernels {
namespace {

using namespace dev;

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kOwnRows = 16 * kWarps;  // keys (dK/dV) or queries (dQ) a block owns
constexpr int kStep = 32;              // queries (dK/dV) or keys (dQ) per iteration

// Shared memory of either kernel: the block's own 64 rows of two matrices, then two
// stages (double-buffered cp.async) of the 32 streamed rows of two matrices and, for
// dK/dV, of their queries' log-sum-exp and delta.
template <int D>
constexpr size_t bwd_smem_bytes() {
  return size_t(2 * kOwnRows + 2 * 2 * kStep) * D * 2 + 2 * 2 * kStep * sizeof(float);
}

// A saved log-sum-exp (natural log) in exp2 units, as subtracted from scale * log2(e) * s:
// a row that saw no keys (-inf) becomes +inf, so that its probabilities come out 0.
__device__ __forceinline__ float lse_exp2_units(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Writes a warp's 16 x D accumulator rows (scaled) to a contiguous (rows, D) gradient.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* out, int64_t row0, int64_t rows, const float (&acc)[D / 8][4],
                                           float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  for (int i = 0; i < 2; ++i) {
    const int64_t row = row0 + g + 8 * i;
    if (row >= rows) continue;
#pragma unroll
    for (int db = 0; db < D / 8; ++db)
      *reinterpret_cast<uint32_t*>(out + row * D + db * 8 + c * 2) =
          pack2<T>(acc[db][2 * i] * scale, acc[db][2 * i + 1] * scale);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const AttentionGradArgs g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const AttentionArgs& a = g.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + kOwnRows * D;
  T* sq = sv + kOwnRows * D;                                     // 2 stages of kStep rows
  T* sdo = sq + 2 * kStep * D;                                   // 2 stages of kStep rows
  float* s_lse = reinterpret_cast<float*>(sdo + 2 * kStep * D);  // 2 stages, as saved
  float* s_delta = s_lse + 2 * kStep;                            // 2 stages

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, c = lane % 4;
  const int64_t k0 = int64_t(blockIdx.x) * kOwnRows, kv = blockIdx.y, b = blockIdx.z;
  const int64_t group = a.heads / a.kv_heads;
  const float k2 = a.scale * kLog2e;

  const KeyRange held = attention_batch_keys(a, b);
  load_rows<D, kOwnRows, kThreads>(sk, row_ptr<T>(a.k, a.k_stride, b, kv, 0), a.k_stride[2], k0, held.begin, held.end);
  load_rows<D, kOwnRows, kThreads>(sv, row_ptr<T>(a.v, a.v_stride, b, kv, 0), a.v_stride[2], k0, held.begin, held.end);
  cp_async_commit();

  // This thread's two keys (rows gr and gr + 8 of its warp) and the queries that see each
  // (attention_query_span of a single key is exact).
  KeyRange seen_by[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t key = k0 + warp * 16 + gr + 8 * i;
    seen_by[i] = key < a.k_len ? attention_query_span(a, b, key, key + 1) : KeyRange{0, 0};
  }

  // The steps: every head of the group, and for each its query tiles that can see these
  // keys (queries.begin, + kStep, ...). The next step's tiles are copied while this one is
  // computed.
  const KeyRange queries = attention_query_span(a, b, k0, k0 + kOwnRows);
  const int64_t steps = group * ceil_div(queries.end - queries.begin, kStep);
  int64_t next_h = kv * group, next_t0 = queries.begin;  // the step copied next
  auto load_next = [&](int stage) {
    load_rows<D, kStep, kThreads>(sq + stage * kStep * D, row_ptr<T>(a.q, a.q_stride, b, next_h, 0), a.q_stride[2],
                                  next_t0, 0, a.q_len);
    load_rows<D, kStep, kThreads>(sdo + stage * kStep * D, row_ptr<T>(g.grad_out, g.grad_out_stride, b, next_h, 0),
                                  g.grad_out_stride[2], next_t0, 0, a.q_len);
    if (threadIdx.x < kStep) {  // rows past q_len read as 0: their tiles are masked
      const int64_t t = next_t0 + threadIdx.x, row = (b * a.heads + next_h) * a.q_len + t;
      const bool inside = t < a.q_len;
      cp_async_4(s_lse + stage * kStep + threadIdx.x, inside ? a.lse + row : a.lse, inside ? 4 : 0);
      cp_async_4(s_delta + stage * kStep + threadIdx.x, inside ? g.delta + row : g.delta, inside ? 4 : 0);
    }
    next_t0 += kStep;
    if (next_t0 >= queries.end) {
      next_t0 = queries.begin;
      ++next_h;
    }
  };
  if (steps > 0) load_next(0);
  cp_async_commit();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  int64_t t0 = queries.begin;  // this step's first query
  for (int64_t n = 0; n < steps; ++n, t0 = t0 + kStep < queries.end ? t0 + kStep : queries.begin) {
    const int stage = int(n & 1);
    if (n + 1 < steps) load_next(stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this step's tiles (and, at the first, the block's keys) have landed
    __syncthreads();
    const T* q_tile = sq + stage * kStep * D;
    const T* do_tile = sdo + stage * kStep * D;

    const bool unmasked = t0 + kStep <= a.q_len &&
                          attention_tile_unmasked(a, b, t0, t0 + kStep - 1, k0, k0 + kOwnRows);
    // This thread's columns (queries nb * 8 + 2c + j): their log-sum-exp and delta.
    float lse2[kStep / 8][2], delta[kStep / 8][2];
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        lse2[nb][j] = lse_exp2_units(s_lse[stage * kStep + nb * 8 + c * 2 + j]);
        delta[nb][j] = s_delta[stage * kStep + nb * 8 + c * 2 + j];
      }
    float p[kStep / 8][4], ds[kStep / 8][4];
    rows_times_rows_t<T, D>(p, sk, warp * 16, q_tile);    // S^T = K Q^T
    rows_times_rows_t<T, D>(ds, sv, warp * 16, do_tile);  // dP^T = V dO^T
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] = exp2_approx(p[nb][e] * k2 - lse2[nb][e & 1]);
    if (!unmasked) mask_columns<kStep>(p, seen_by, t0, 0.0f);  // block-uniform: edge tiles only
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = p[nb][e] * (ds[nb][e] - delta[nb][e & 1]);
    accumulate_times_rows<T, D>(dv, p, do_tile);  // dV += P^T dO
    accumulate_times_rows<T, D>(dk, ds, q_tile);  // dK += dS^T Q
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  const int64_t kv_rows = (b * a.kv_heads + kv) * a.k_len;  // (b, kv, key) rows of the gradients
  store_rows<T, D>(static_cast<T*>(g.grad_k) + kv_rows * D, k0 + warp * 16, a.k_len, dk, a.scale);
  store_rows<T, D>(static_cast<T*>(g.grad_v) + kv_rows * D, k0 + warp * 16, a.k_len, dv, 1.0f);
#else
  __trap();  // mma.sync bf16/fp16 and cp.async need sm_80+; the host never launches this
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(const AttentionGradArgs g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const AttentionArgs& a = g.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sdo = sq + kOwnRows * D;
  T* sk = sdo + kOwnRows * D;  // 2 stages of kStep rows
  T* sv = sk + 2 * kStep * D;  // 2 stages of kStep rows

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4;
  const int64_t t0 = int64_t(blockIdx.x) * kOwnRows, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / (a.heads / a.kv_heads);
  const float k2 = a.scale * kLog2e;

  load_rows<D, kOwnRows, kThreads>(sq, row_ptr<T>(a.q, a.q_stride, b, h, 0), a.q_stride[2], t0, 0, a.q_len);
  load_rows<D, kOwnRows, kThreads>(sdo, row_ptr<T>(g.grad_out, g.grad_out_stride, b, h, 0), g.grad_out_stride[2], t0,
                                   0, a.q_len);
  cp_async_commit();

  // This thread's two query rows: their saved statistics and the keys each sees.
  float lse[2], delta[2];
  KeyRange keys[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t query = t0 + warp * 16 + gr + 8 * i;
    const int64_t row = (b * a.heads + h) * a.q_len + query;
    lse[i] = query < a.q_len ? lse_exp2_units(a.lse[row]) : INFINITY;
    delta[i] = query < a.q_len ? g.delta[row] : 0.0f;
    keys[i] = query < a.q_len ? attention_row_keys(a, b, query) : KeyRange{0, 0};
  }
  const int64_t t_last = (t0 + kOwnRows < a.q_len ? t0 + kOwnRows : a.q_len) - 1;
  const KeyRange span = attention_span_keys(a, b, t0, t_last);

  // The key tiles: the next one is copied while this one is computed.
  const T* k_rows = row_ptr<T>(a.k, a.k_stride, b, kv, 0);
  const T* v_rows = row_ptr<T>(a.v, a.v_stride, b, kv, 0);
  const KeyRange held = attention_batch_keys(a, b);
  auto load_keys = [&](int64_t j0, int stage) {
    load_rows<D, kStep, kThreads>(sk + stage * kStep * D, k_rows, a.k_stride[2], j0, held.begin, held.end);
    load_rows<D, kStep, kThreads>(sv + stage * kStep * D, v_rows, a.v_stride[2], j0, held.begin, held.end);
  };
  if (span.begin < span.end) load_keys(span.begin, 0);
  cp_async_commit();

  float dq[D / 8][4] = {};
  for (int64_t j0 = span.begin; j0 < span.end; j0 += kStep) {
    const int stage = int(((j0 - span.begin) / kStep) & 1);
    if (j0 + kStep < span.end) load_keys(j0 + kStep, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this tile (and, at the first, the block's queries) has landed
    __syncthreads();
    const T* k_tile = sk + stage * kStep * D;
    const T* v_tile = sv + stage * kStep * D;

    const bool unmasked = attention_tile_unmasked(a, b, t0, t_last, j0, j0 + kStep);
    float p[kStep / 8][4], ds[kStep / 8][4];
    rows_times_rows_t<T, D>(p, sq, warp * 16, k_tile);    // S = Q K^T
    rows_times_rows_t<T, D>(ds, sdo, warp * 16, v_tile);  // dP = dO V^T
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] = exp2_approx(p[nb][e] * k2 - lse[e / 2]);
    if (!unmasked) mask_columns<kStep>(p, keys, j0, 0.0f);  // block-uniform: edge tiles only
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = p[nb][e] * (ds[nb][e] - delta[e / 2]);
    accumulate_times_rows<T, D>(dq, ds, k_tile);  // dQ += dS K
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  const int64_t q_rows = (b * a.heads + h) * a.q_len;
  store_rows<T, D>(static_cast<T*>(g.grad_q) + q_rows * D, t0 + warp * 16, a.q_len, dq, a.scale);
#else
  __trap();
#endif
}

template <typename T, int D>
cudaError_t launch_bwd(const AttentionGradArgs& g, cudaStream_t stream) {
  const AttentionArgs& a = g.fwd;
  constexpr size_t smem = bwd_smem_bytes<D>();
  constexpr auto dkdv = attention_dkdv_kernel<T, D>;
  constexpr auto dq = attention_dq_kernel<T, D>;
  cudaError_t err = allow_dynamic_smem<dkdv>(smem);
  if (err == cudaSuccess) err = allow_dynamic_smem<dq>(smem);
  if (err != cudaSuccess) return err;
  if (a.k_len > 0) {
    dkdv<<<dim3(unsigned(ceil_div(a.k_len, kOwnRows)), unsigned(a.kv_heads), unsigned(a.batch)), kThreads, smem,
           stream>>>(g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  dq<<<dim3(unsigned(ceil_div(a.q_len, kOwnRows)), unsigned(a.heads), unsigned(a.batch)), kThreads, smem, stream>>>(
      g);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward(const AttentionGradArgs& args, DType dtype, cudaStream_t stream) {
  const AttentionArgs& a = args.fwd;
  if (!attention_supported(a, dtype) || a.batch > 65535 || a.heads > 65535) return cudaErrorInvalidValue;
  if (a.batch == 0 || a.q_len == 0 || a.heads == 0) return cudaSuccess;  // grad_k/v are zeroed by the caller
  if (dtype == DType::F16) {
    return a.head_dim == 64 ? launch_bwd<__half, 64>(args, stream) : launch_bwd<__half, 128>(args, stream);
  }
  return a.head_dim == 64 ? launch_bwd<__nv_bfloat16, 64>(args, stream) : launch_bwd<__nv_bfloat16, 128>(args, stream);
}

}  // namespace gptext::kernels
