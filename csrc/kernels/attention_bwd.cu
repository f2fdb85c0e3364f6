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
// Unverified: bench/gpu_suite.sh verified these kernels on an H100 (sm_90) on 2026-11-23
// (commit 3a9f802), before their loops were reworked (unrolled tile copies, masks only on
// edge tiles from per-thread ranges, .ftz exponentials: ~415 / ~725 instructions a warp per
// step at D = 64 for dQ / dK dV, from ~2000 / ~2400 in the sm_90 SASS); the reworked loops
// have not run on a GPU yet. The sm_80 build has never run on a GPU.
#include "attention_tiles.cuh"
#include "launch.h"

namespace gptext::kernels {
namespace {

using namespace dev;

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kOwnRows = 16 * kWarps;  // keys (dK/dV) or queries (dQ) a block owns
constexpr int kStep = 32;              // queries (dK/dV) or keys (dQ) per iteration

template <int D>
constexpr size_t bwd_smem_bytes() {
  return size_t(2 * kOwnRows + 2 * kStep) * D * 2 + 2 * kStep * sizeof(float);
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
  T* sq = sv + kOwnRows * D;
  T* sdo = sq + kStep * D;
  float* s_lse = reinterpret_cast<float*>(sdo + kStep * D);  // in exp2 units
  float* s_delta = s_lse + kStep;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, c = lane % 4;
  const int64_t k0 = int64_t(blockIdx.x) * kOwnRows, kv = blockIdx.y, b = blockIdx.z;
  const int64_t group = a.heads / a.kv_heads;
  const float k2 = a.scale * kLog2e;

  load_rows<D, kOwnRows, kThreads>(sk, row_ptr<T>(a.k, a.k_stride, b, kv, 0), a.k_stride[2], k0, a.k_len);
  load_rows<D, kOwnRows, kThreads>(sv, row_ptr<T>(a.v, a.v_stride, b, kv, 0), a.v_stride[2], k0, a.k_len);
  cp_async_commit();

  // This thread's two keys (rows gr and gr + 8 of its warp) and the queries that see each
  // (attention_query_span of a single key is exact).
  KeyRange seen_by[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t key = k0 + warp * 16 + gr + 8 * i;
    seen_by[i] = key < a.k_len ? attention_query_span(a, b, key, key + 1) : KeyRange{0, 0};
  }

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const KeyRange queries = attention_query_span(a, b, k0, k0 + kOwnRows);
  for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
    const T* q_rows = row_ptr<T>(a.q, a.q_stride, b, h, 0);
    const T* do_rows = row_ptr<T>(g.grad_out, g.grad_out_stride, b, h, 0);
    for (int64_t t0 = queries.begin; t0 < queries.end; t0 += kStep) {
      load_rows<D, kStep, kThreads>(sq, q_rows, a.q_stride[2], t0, a.q_len);
      load_rows<D, kStep, kThreads>(sdo, do_rows, g.grad_out_stride[2], t0, a.q_len);
      cp_async_commit();
      for (int i = threadIdx.x; i < kStep; i += kThreads) {
        const int64_t t = t0 + i;
        const int64_t row = (b * a.heads + h) * a.q_len + t;
        s_lse[i] = t < a.q_len ? lse_exp2_units(a.lse[row]) : INFINITY;  // +inf: no probability
        s_delta[i] = t < a.q_len ? g.delta[row] : 0.0f;
      }
      cp_async_wait<0>();
      __syncthreads();

      const bool unmasked = t0 + kStep <= a.q_len &&
                            attention_tile_unmasked(a, b, t0, t0 + kStep - 1, k0, k0 + kOwnRows);
      float p[kStep / 8][4], ds[kStep / 8][4];
      rows_times_rows_t<T, D>(p, sk, warp * 16, sq);    // S^T = K Q^T
      rows_times_rows_t<T, D>(ds, sv, warp * 16, sdo);  // dP^T = V dO^T
#pragma unroll
      for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[nb][e] = exp2_approx(p[nb][e] * k2 - s_lse[nb * 8 + c * 2 + (e & 1)]);
      if (!unmasked) mask_columns<kStep>(p, seen_by, t0, 0.0f);  // block-uniform: edge tiles only
#pragma unroll
      for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[nb][e] = p[nb][e] * (ds[nb][e] - s_delta[nb * 8 + c * 2 + (e & 1)]);
      accumulate_times_rows<T, D>(dv, p, sdo);  // dV += P^T dO
      accumulate_times_rows<T, D>(dk, ds, sq);  // dK += dS^T Q
      __syncthreads();  // before the next query tile overwrites sq / sdo
    }
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
  T* sk = sdo + kOwnRows * D;
  T* sv = sk + kStep * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4;
  const int64_t t0 = int64_t(blockIdx.x) * kOwnRows, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / (a.heads / a.kv_heads);
  const float k2 = a.scale * kLog2e;

  load_rows<D, kOwnRows, kThreads>(sq, row_ptr<T>(a.q, a.q_stride, b, h, 0), a.q_stride[2], t0, a.q_len);
  load_rows<D, kOwnRows, kThreads>(sdo, row_ptr<T>(g.grad_out, g.grad_out_stride, b, h, 0), g.grad_out_stride[2], t0,
                                   a.q_len);
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

  float dq[D / 8][4] = {};
  const T* k_rows = row_ptr<T>(a.k, a.k_stride, b, kv, 0);
  const T* v_rows = row_ptr<T>(a.v, a.v_stride, b, kv, 0);
  for (int64_t j0 = span.begin; j0 < span.end; j0 += kStep) {
    load_rows<D, kStep, kThreads>(sk, k_rows, a.k_stride[2], j0, a.k_len);
    load_rows<D, kStep, kThreads>(sv, v_rows, a.v_stride[2], j0, a.k_len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const bool unmasked = attention_tile_unmasked(a, b, t0, t_last, j0, j0 + kStep);
    float p[kStep / 8][4], ds[kStep / 8][4];
    rows_times_rows_t<T, D>(p, sq, warp * 16, sk);    // S = Q K^T
    rows_times_rows_t<T, D>(ds, sdo, warp * 16, sv);  // dP = dO V^T
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] = exp2_approx(p[nb][e] * k2 - lse[e / 2]);
    if (!unmasked) mask_columns<kStep>(p, keys, j0, 0.0f);  // block-uniform: edge tiles only
#pragma unroll
    for (int nb = 0; nb < kStep / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = p[nb][e] * (ds[nb][e] - delta[e / 2]);
    accumulate_times_rows<T, D>(dq, ds, sk);  // dQ += dS K
    __syncthreads();  // before the next key tile overwrites sk / sv
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
