// The problem descriptions shared by the CUDA launchers (launch.h) and the CPU kernels
// (csrc/cpu/cpu_kernels.h): plain pointers and sizes, no torch and no CUDA headers.
// Pointers address contiguous row-major data of the DType the caller names.
#pragma once

#include <cstdint>

#include "activations.cuh"
#include "common.cuh"

namespace gptext {

// Cross-entropy of rows of logits against one target index a row (the classifier's loss,
// fused: the row's softmax is never stored). Forward: lse[r] = log(sum_j exp(x[r, j])) and
// loss[r] = lse[r] - x[r, t_r] in fp32; a row whose target is ignore_index gets loss 0, one
// whose target is outside [0, cols) gets NaN. Backward: dx[r, j] = (exp(x[r, j] - lse[r]) -
// [j == t_r]) * grad[r], rounded to x's dtype once; an ignored row (or one whose target is
// out of range) gets zeros.
struct CrossEntropyArgs {
  const void* x;           // (rows, cols) logits
  const int64_t* targets;  // (rows,)
  float* loss;             // forward: (rows,)
  float* lse;              // (rows,): written by the forward, read by the backward
  const float* grad;       // backward: (rows,), d(total) / d(loss[r])
  void* dx;                // backward: (rows, cols), x's dtype
  int64_t rows;
  int64_t cols;
  int64_t ignore_index;
};

// Softmax over the last dimension: y[r, :] = softmax(scale * x[r, :]) restricted to the
// keys attention_key_range() allows for row r, whose query index is r % q_len. With
// causal == false every key is visible. Masked positions come out as 0.
struct SoftmaxArgs {
  const void* x;
  void* y;
  int64_t rows;
  int64_t cols;
  float scale;     // > 0
  bool causal;
  int64_t window;  // 0: no window
  int64_t q_len;   // rows per (batch, head) block of scores; used only when causal
};

// LayerNorm or RMSNorm over the last dimension, optionally after a residual add:
//   v = x (+ residual, rounded to the storage type and written to `sum`);
//   LayerNorm: out = (v - mean(v)) * rstd * weight (+ bias), rstd = 1/sqrt(var(v) + eps);
//   RMSNorm:   out = v * rstd * weight,                       rstd = 1/sqrt(mean(v^2) + eps);
// mean and rstd (fp32, one per row) are written when their pointers are non-null (an
// RMSNorm has no mean to write: it is taken as 0).
struct NormArgs {
  const void* x;
  const void* residual;  // null: plain LayerNorm
  const void* weight;
  const void* bias;      // null: no shift
  void* out;
  void* sum;             // required when residual is given
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t cols;
  float eps;
  bool rms;              // RMSNorm: no centring (mean taken as 0) and no bias
};

// GEMM with a fused epilogue: c[M, N] = act(a[M, K] @ b[N, K]^T + bias[N]) + residual[M, N].
// a and b are K-contiguous (b is a PyTorch Linear weight as stored, [out, in]); c and
// residual are N-contiguous with leading dimension ldc. The epilogue-only entry points
// (c already holds the product) read just c, bias, residual, m, n, ldc and act.
struct GemmArgs {
  const void* a;
  const void* b;
  void* c;
  const void* bias;      // may be null
  const void* residual;  // may be null; leading dimension ldc
  int64_t m;
  int64_t n;
  int64_t k;
  int64_t lda;
  int64_t ldb;
  int64_t ldc;
  Activation act;
};

// RoPE on the two halves of each head (gpt-oss's layout, not interleaved pairs): for each
// row (b, h, t) of x and i < head_dim / 2, with c = cos[b, t, i] and s = sin[b, t, i],
//   out[i] = x[i] c - x[i + head_dim / 2] s,   out[i + head_dim / 2] = x[i + head_dim / 2] c + x[i] s,
// in fp32, rounded once. x is 4-d (batch, heads, positions, head_dim) with head_dim
// contiguous and the other strides given; cos and sin are contiguous fp32 (batch,
// positions, head_dim / 2); out is contiguous (batch, heads, positions, head_dim).
struct RopeArgs {
  const void* x;
  const float* cos;
  const float* sin;
  void* out;
  int64_t batch, heads, positions, head_dim;  // head_dim even
  int64_t x_stride[3];                        // batch, head, position
};

// The linear layers of a mixture of experts, one per route. Route r < tokens * slots is
// token r / slots's choice number r % slots; it multiplies its row of x by its expert's
// matrix:
//   h[r, :] = x_row(r) @ weight[e]^T + bias[e],   e = experts[r],   weight (num_experts, n, k),
// accumulated in fp32 and rounded to the storage type, as a linear layer's output is. out[r]
// is that row (n columns), or with swiglu the swiglu_clamped() of each pair of columns (2j
// the gate, 2j + 1 the linear half: n / 2 columns). x_row(r) is x[r] when x_per_route, else
// x[r / slots] (every choice of a token reads the token's row). An expert index outside
// [0, num_experts) gives a row of NaN on the GPU (the CPU implementation raises instead).
struct ExpertArgs {
  const void* x;
  const void* weight;
  const void* bias;        // (num_experts, n); may be null
  const int64_t* experts;  // (tokens * slots,)
  void* out;
  int64_t tokens;
  int64_t slots;
  int64_t num_experts;
  int64_t n;
  int64_t k;
  bool x_per_route;
  bool swiglu;             // n even
  float limit;             // swiglu's clamp, > 0
};

}  // namespace gptext

namespace gptext {

// Fused attention: out[b, h, t] = softmax_j(scale * q[b, h, t] . k[b, g, j]) v[b, g, j]
// with g = h / (heads / kv_heads) (grouped-query attention), over the keys j that
// attention_row_keys() allows. Tensors are 4-d (batch, head, position, head_dim) with
// head_dim contiguous and the other three strides given (in elements).
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                // (batch, heads, q_len): log-sum-exp of the scaled scores (and sink); may be null
  const float* sinks;        // (heads,): a logit per head that joins every softmax denominator; may be null
  const int32_t* kv_starts;  // (batch,): keys before it are padding, never attended; may be null (0)
  const int32_t* kv_lens;    // (batch,): keys from it on don't exist yet; queries align to it; may be null (k_len)
  int64_t batch, heads, kv_heads, q_len, k_len, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  // batch, head, position
  float scale;
  bool causal;
  int64_t window;  // 0: no window
};

// The backward pass of AttentionArgs' attention, recomputing the probabilities from the
// forward's log-sum-exp. Gradients are written contiguous: (batch, heads, q_len, head_dim)
// for q, (batch, kv_heads, k_len, head_dim) for k and v.
struct AttentionGradArgs {
  AttentionArgs fwd;  // q, k, v, out and lse of the forward pass
  const void* grad_out;
  int64_t grad_out_stride[3];
  const float* delta;  // (batch, heads, q_len): sum over head_dim of grad_out * out
  void* grad_q;
  void* grad_k;
  void* grad_v;
};

}  // namespace gptext
