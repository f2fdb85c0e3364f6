// Tensor-level checks and problem set-up shared by the CPU (ops.cpp) and CUDA (cuda_ops.cpp)
// implementations of gptext's ops. Each op validates its inputs here once, with messages
// that name the argument and what was expected, then hands plain pointers to a kernel.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "kernels/args.h"

namespace gptext {

// ---- GEMM policy (set from Python: gptext.set_gemm_policy / GPTEXT_GEMM) ---------------
enum class GemmPolicy : int { Auto = 0, Wmma = 1, Cublas = 2 };
GemmPolicy gemm_policy();
GemmPolicy parse_gemm_policy(const std::string& name);
const char* gemm_policy_name(GemmPolicy policy);

// ---- checks --------------------------------------------------------------------------
inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "gptext.ops.", op, ": ", arg, " has dtype ", t.scalar_type(),
                       "; expected float32, float16 or bfloat16");
  }
}

// `t` must match `like` in dtype and device (the kernels take one dtype per call).
inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* op, const char* arg,
                       const char* like_arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "gptext.ops.", op, ": ", arg, " has dtype ",
                   t.scalar_type(), " but ", like_arg, " has ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "gptext.ops.", op, ": ", arg, " is on ", t.device(), " but ",
                    like_arg, " is on ", like.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "gptext.ops.", op, ": ", arg, " has shape ", t.sizes(), "; expected ",
                    expected);
}

inline Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::None;
  if (name == "gelu") return Activation::Gelu;
  if (name == "relu") return Activation::Relu;
  TORCH_CHECK_VALUE(false, "gptext.ops.linear: activation must be 'none', 'gelu' or 'relu', got '", name, "'");
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

// t itself when its last dimension is contiguous (the kernels honour the other strides).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline int64_t rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.numel() / t.size(-1); }

// ---- softmax -------------------------------------------------------------------------
struct SoftmaxProblem {
  at::Tensor x;    // contiguous, softmax dimension last
  at::Tensor y;    // output in the same layout
  int64_t dim;     // where the softmax dimension goes back to
  DType dtype;
  SoftmaxArgs args;
};

inline SoftmaxProblem softmax_problem(const at::Tensor& x_in, int64_t dim, double scale, bool causal, int64_t window) {
  SoftmaxProblem p;
  p.dtype = kernel_dtype(x_in, "softmax", "x");
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "gptext.ops.softmax: x must have at least one dimension");
  const int64_t ndim = x_in.dim();
  TORCH_CHECK_INDEX(dim >= -ndim && dim < ndim, "gptext.ops.softmax: dim ", dim, " is out of range for a ", ndim,
                    "-d tensor");
  dim = dim < 0 ? dim + ndim : dim;
  TORCH_CHECK_VALUE(scale > 0.0 && std::isfinite(scale), "gptext.ops.softmax: scale must be a positive finite number, got ",
                    scale);
  TORCH_CHECK_VALUE(window >= 0, "gptext.ops.softmax: window must be >= 0 (0 means no window), got ", window);
  if (causal || window > 0) {
    TORCH_CHECK_VALUE(causal, "gptext.ops.softmax: a window needs causal=True");
    TORCH_CHECK_VALUE(ndim >= 2 && dim == ndim - 1,
                      "gptext.ops.softmax: causal masking needs scores shaped (..., q_len, k_len) and dim=-1");
  }
  p.dim = dim;
  p.x = (dim == ndim - 1 ? x_in : x_in.movedim(dim, -1)).contiguous();
  p.y = at::empty(p.x.sizes(), p.x.options());
  const int64_t cols = p.x.size(-1);
  p.args = SoftmaxArgs{p.x.data_ptr(), p.y.data_ptr(), cols == 0 ? 0 : p.x.numel() / cols, cols, float(scale),
                       causal, window, causal ? p.x.size(-2) : 1};
  return p;
}

// The output in the caller's layout (contiguous, as the fake implementation promises).
inline at::Tensor softmax_result(const SoftmaxProblem& p) {
  return p.dim == p.y.dim() - 1 ? p.y : p.y.movedim(-1, p.dim).contiguous();
}

// ---- cross-entropy -----------------------------------------------------------------------
// Checks of cross_entropy(logits (rows, cols), targets (rows,) int64, ignore_index) and its
// backward's extra arguments; the targets' range is the kernels' to handle (NaN loss), as
// reading them here would synchronise a GPU.
struct CrossEntropyProblem {
  at::Tensor logits, targets, loss, lse, grad, dx;
  DType dtype;
  CrossEntropyArgs args;
};

inline CrossEntropyProblem cross_entropy_problem(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                                                 int64_t ignore_index) {
  CrossEntropyProblem p;
  p.dtype = kernel_dtype(logits, "cross_entropy", "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, "gptext.ops.", op, ": logits must be 2-d (rows, classes), got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "gptext.ops.", op, ": targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), "gptext.ops.", op, ": targets is on ", targets.device(),
                    " but logits is on ", logits.device());
  check_shape(targets, {logits.size(0)}, op, "targets");
  TORCH_CHECK_VALUE(logits.size(1) > 0 || logits.size(0) == 0, "gptext.ops.", op, ": logits has no classes");
  p.logits = logits.contiguous();
  p.targets = targets.contiguous();
  p.args = CrossEntropyArgs{p.logits.data_ptr(), p.targets.data_ptr<int64_t>(), nullptr, nullptr, nullptr, nullptr,
                            logits.size(0), logits.size(1), ignore_index};
  return p;
}

inline CrossEntropyProblem cross_entropy_forward_problem(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index) {
  CrossEntropyProblem p = cross_entropy_problem("cross_entropy", logits, targets, ignore_index);
  const auto f32 = p.logits.options().dtype(at::kFloat);
  p.loss = at::empty({p.args.rows}, f32);
  p.lse = at::empty({p.args.rows}, f32);
  p.args.loss = p.loss.data_ptr<float>();
  p.args.lse = p.lse.data_ptr<float>();
  return p;
}

inline CrossEntropyProblem cross_entropy_backward_problem(const at::Tensor& grad, const at::Tensor& logits,
                                                          const at::Tensor& targets, const at::Tensor& lse,
                                                          int64_t ignore_index) {
  const char* op = "cross_entropy_backward";
  CrossEntropyProblem p = cross_entropy_problem(op, logits, targets, ignore_index);
  for (const auto& [t, name] : {std::pair{&grad, "grad"}, std::pair{&lse, "lse"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "gptext.ops.", op, ": ", name, " must be float32, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == logits.device(), "gptext.ops.", op, ": ", name, " is on ", t->device(),
                      " but logits is on ", logits.device());
    check_shape(*t, {p.args.rows}, op, name);
  }
  p.grad = grad.contiguous();
  p.lse = lse.contiguous();
  p.dx = at::empty(p.logits.sizes(), p.logits.options());
  p.args.grad = p.grad.data_ptr<float>();
  p.args.lse = const_cast<float*>(p.lse.data_ptr<float>());
  p.args.dx = p.dx.data_ptr();
  return p;
}

// ---- LayerNorm and RMSNorm -------------------------------------------------------------
struct NormProblem {
  at::Tensor x, residual, weight, bias;  // contiguous; residual/bias undefined when absent
  at::Tensor out, sum, mean, rstd;       // mean undefined for an RMSNorm
  DType dtype;
  NormArgs args;
};

inline NormProblem norm_problem(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps,
                                bool rms = false) {
  NormProblem p;
  p.dtype = kernel_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "gptext.ops.", op,
                    ": x must have a non-empty last (normalised) dimension, got shape ", x.sizes());
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), "gptext.ops.", op, ": eps must be a finite number >= 0, got ",
                    eps);
  const int64_t cols = x.size(-1);
  check_same(weight, x, op, "weight", "x");
  check_shape(weight, {cols}, op, "weight");
  if (bias.has_value()) {
    check_same(*bias, x, op, "bias", "x");
    check_shape(*bias, {cols}, op, "bias");
    p.bias = bias->contiguous();
  }
  if (residual.has_value()) {
    check_same(*residual, x, op, "residual", "x");
    check_shape(*residual, x.sizes(), op, "residual");
    p.residual = residual->contiguous();
    p.sum = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  }
  p.x = x.contiguous();
  p.weight = weight.contiguous();
  p.out = at::empty(x.sizes(), p.x.options());
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  if (!rms) p.mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  p.rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  p.args = NormArgs{p.x.data_ptr(),
                    p.residual.defined() ? p.residual.data_ptr() : nullptr,
                    p.weight.data_ptr(),
                    p.bias.defined() ? p.bias.data_ptr() : nullptr,
                    p.out.data_ptr(),
                    p.sum.defined() ? p.sum.data_ptr() : nullptr,
                    p.mean.defined() ? p.mean.data_ptr<float>() : nullptr,
                    p.rstd.data_ptr<float>(),
                    rows_of(p.x),
                    cols,
                    float(eps),
                    rms};
  return p;
}

// ---- linear --------------------------------------------------------------------------
struct LinearProblem {
  at::Tensor x2d;       // [M, K], contiguous
  at::Tensor weight;    // [N, K], contiguous
  at::Tensor bias;      // [N] or undefined
  at::Tensor residual;  // [M, N] contiguous or undefined
  std::vector<int64_t> out_shape;
  DType dtype;
  GemmArgs args;        // c is filled in by the implementation
};

inline LinearProblem linear_problem(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const std::string& activation,
                                    const std::optional<at::Tensor>& residual) {
  LinearProblem p;
  p.dtype = kernel_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "gptext.ops.", op, ": x must have at least one dimension");
  check_same(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(weight.dim() == 2, "gptext.ops.", op, ": weight must be 2-d [out_features, in_features], got shape ",
                    weight.sizes());
  const int64_t k = x.size(-1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, "gptext.ops.", op, ": x has ", k, " features in its last dimension but weight ",
                    weight.sizes(), " expects ", weight.size(1));
  p.out_shape = x.sizes().vec();
  p.out_shape.back() = n;
  if (bias.has_value()) {
    check_same(*bias, x, op, "bias", "x");
    check_shape(*bias, {n}, op, "bias");
    p.bias = bias->contiguous();
  }
  // Rows of the flattened input, counted from the leading sizes (view({-1, k}) is ambiguous
  // when k or n is 0).
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  if (residual.has_value()) {
    check_same(*residual, x, op, "residual", "x");
    check_shape(*residual, p.out_shape, op, "residual");
    p.residual = residual->contiguous().view({m, n});
  }
  p.x2d = x.contiguous().view({m, k});
  p.weight = weight.contiguous();
  p.args = GemmArgs{p.x2d.data_ptr(), p.weight.data_ptr(), nullptr,
                    p.bias.defined() ? p.bias.data_ptr() : nullptr,
                    p.residual.defined() ? p.residual.data_ptr() : nullptr,
                    m, n, k, k, k, n, parse_activation(activation)};
  return p;
}

// ---- RoPE ------------------------------------------------------------------------------
// x (batch, heads, positions, head_dim), any strides (head_dim made contiguous if it is
// not); cos, sin fp32 (batch, positions, head_dim / 2); out contiguous like x.
struct RopeProblem {
  at::Tensor x, cos, sin, out;
  DType dtype;
  RopeArgs args;
};

inline RopeProblem rope_problem(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "rope";
  RopeProblem p;
  p.dtype = kernel_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, "gptext.ops.rope: x must be 4-d (batch, heads, positions, head_dim), got shape ",
                    x.sizes());
  const int64_t batch = x.size(0), heads = x.size(1), positions = x.size(2), dim = x.size(3);
  TORCH_CHECK_VALUE(dim % 2 == 0, "gptext.ops.rope: head_dim must be even (its two halves are rotated as "
                    "pairs), got ", dim);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "gptext.ops.rope: ", name, " must be float32, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), "gptext.ops.rope: ", name, " is on ", t.device(), " but x is on ",
                      x.device());
    check_shape(t, {batch, positions, dim / 2}, op, name);
  }
  p.x = last_dim_contiguous(x);
  p.cos = cos.contiguous();
  p.sin = sin.contiguous();
  p.out = at::empty({batch, heads, positions, dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  p.args = RopeArgs{p.x.data_ptr(), p.cos.data_ptr<float>(), p.sin.data_ptr<float>(), p.out.data_ptr(),
                    batch, heads, positions, dim, {p.x.stride(0), p.x.stride(1), p.x.stride(2)}};
  return p;
}

// ---- expert linear layers (mixture of experts) ----------------------------------------
// x (tokens, k) or (tokens, slots, k); weight (num_experts, n, k); bias (num_experts, n);
// experts (tokens, slots), integer; out (tokens, slots, n), or n / 2 columns with SwiGLU.
struct ExpertProblem {
  at::Tensor x;        // contiguous
  at::Tensor weight;   // contiguous
  at::Tensor bias;     // contiguous or undefined
  at::Tensor experts;  // int64, contiguous
  at::Tensor out;      // (tokens, slots, out columns), allocated
  DType dtype;
  ExpertArgs args;
};

inline ExpertProblem expert_problem(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& experts,
                                    const std::string& activation, double limit) {
  constexpr const char* op = "expert_linear";
  ExpertProblem p;
  p.dtype = kernel_dtype(x, op, "x");
  check_same(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(activation == "none" || activation == "swiglu",
                    "gptext.ops.expert_linear: activation must be 'none' or 'swiglu', got '", activation, "'");
  const bool swiglu = activation == "swiglu";
  TORCH_CHECK_VALUE(!swiglu || (std::isfinite(limit) && limit > 0), "gptext.ops.expert_linear: limit must be a "
                    "positive finite number, got ", limit);
  TORCH_CHECK_VALUE(weight.dim() == 3, "gptext.ops.expert_linear: weight must be 3-d (experts, out_features, "
                    "in_features), got shape ", weight.sizes());
  TORCH_CHECK_TYPE(experts.scalar_type() == at::kLong || experts.scalar_type() == at::kInt,
                   "gptext.ops.expert_linear: experts must be an int64 or int32 tensor, got ", experts.scalar_type());
  TORCH_CHECK_VALUE(experts.device() == x.device(), "gptext.ops.expert_linear: experts is on ", experts.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(experts.dim() == 2, "gptext.ops.expert_linear: experts must be 2-d (tokens, slots), got shape ",
                    experts.sizes());
  const int64_t tokens = experts.size(0), slots = experts.size(1);
  const int64_t num_experts = weight.size(0), n = weight.size(1), k = weight.size(2);
  TORCH_CHECK_VALUE((x.dim() == 2 && x.size(0) == tokens) ||
                        (x.dim() == 3 && x.size(0) == tokens && x.size(1) == slots),
                    "gptext.ops.expert_linear: x has shape ", x.sizes(), "; expected (tokens, in_features) or "
                    "(tokens, slots, in_features) with (tokens, slots) = ", experts.sizes(), " as experts has");
  TORCH_CHECK_VALUE(x.size(-1) == k, "gptext.ops.expert_linear: x has ", x.size(-1), " features in its last "
                    "dimension but weight ", weight.sizes(), " expects ", k);
  TORCH_CHECK_VALUE(num_experts > 0, "gptext.ops.expert_linear: weight has no experts (shape ", weight.sizes(), ")");
  TORCH_CHECK_VALUE(!swiglu || n % 2 == 0, "gptext.ops.expert_linear: SwiGLU needs an even number of output "
                    "features (gate and linear columns alternate), got ", n);
  if (bias.has_value()) {
    check_same(*bias, x, op, "bias", "x");
    check_shape(*bias, {num_experts, n}, op, "bias");
    p.bias = bias->contiguous();
  }
  p.x = x.contiguous();
  p.weight = weight.contiguous();
  p.experts = experts.to(at::kLong).contiguous();
  p.out = at::empty({tokens, slots, swiglu ? n / 2 : n}, x.options());
  p.args = ExpertArgs{p.x.data_ptr(), p.weight.data_ptr(), p.bias.defined() ? p.bias.data_ptr() : nullptr,
                      p.experts.data_ptr<int64_t>(), p.out.data_ptr(), tokens, slots, num_experts, n, k,
                      x.dim() == 3, swiglu, float(limit)};
  return p;
}

// Whether expert_linear groups the routes by expert (one GEMM per expert over its routes'
// rows) rather than taking them one by one (a matrix-vector product per route, each reading
// its expert's whole matrix). Decided from the sizes alone, never the indices, so that the
// choice needs nothing from the device. Routes beyond twice the experts (or 64): on
// average each expert's matrix would otherwise be read more than twice.
inline bool expert_routes_grouped(const ExpertArgs& a) {
  const int64_t routes = a.tokens * a.slots;
  return routes > 64 && routes > 2 * a.num_experts;
}

// ---- attention -----------------------------------------------------------------------
struct AttentionProblem {
  at::Tensor q, k, v;                 // head_dim contiguous (made so if it was not)
  at::Tensor sinks, kv_starts, kv_lens;  // fp32 / int32, contiguous; undefined when absent
  at::Tensor out, lse;
  DType dtype;
  AttentionArgs args;
};

inline void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

inline AttentionProblem attention_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                          int64_t window, const std::optional<at::Tensor>& sinks, double scale,
                                          const std::optional<at::Tensor>& kv_starts,
                                          const std::optional<at::Tensor>& kv_lens) {
  const char* op = "attention";
  AttentionProblem p;
  p.dtype = kernel_dtype(q, op, "q");
  check_same(k, q, op, "k", "q");
  check_same(v, q, op, "v", "q");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "gptext.ops.attention: q, k and v must be 4-d "
                    "(batch, heads, positions, head_dim), got ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "gptext.ops.attention: k ", k.sizes(), " and v ", v.sizes(),
                    " must have the same shape");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(3) == q.size(3), "gptext.ops.attention: k ", k.sizes(),
                    " must match q ", q.sizes(), " in batch and head_dim");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "gptext.ops.attention: q's ", q.size(1),
                    " heads must be a multiple of k's ", k.size(1), " (grouped-query attention)");
  TORCH_CHECK_VALUE(q.size(3) > 0, "gptext.ops.attention: head_dim must be positive");
  TORCH_CHECK_VALUE(scale > 0.0 && std::isfinite(scale), "gptext.ops.attention: scale must be a positive finite "
                    "number, got ", scale);
  TORCH_CHECK_VALUE(window >= 0 && (window == 0 || causal), "gptext.ops.attention: window must be >= 0 and needs "
                    "causal=True, got window=", window);
  const int64_t batch = q.size(0), heads = q.size(1);
  if (sinks.has_value()) {
    TORCH_CHECK_TYPE(sinks->is_floating_point(), "gptext.ops.attention: sinks must be a floating-point tensor, got ",
                     sinks->scalar_type());
    TORCH_CHECK_VALUE(sinks->device() == q.device() && sinks->dim() == 1 && sinks->size(0) == heads,
                      "gptext.ops.attention: sinks must be a (", heads, ",) tensor on ", q.device(), ", got ",
                      sinks->sizes(), " on ", sinks->device());
    p.sinks = sinks->to(at::kFloat).contiguous();
  }
  const std::optional<at::Tensor>* lengths[] = {&kv_starts, &kv_lens};
  at::Tensor* targets[] = {&p.kv_starts, &p.kv_lens};
  for (int i = 0; i < 2; ++i) {
    if (!lengths[i]->has_value()) continue;
    const at::Tensor& t = **lengths[i];
    TORCH_CHECK_VALUE(t.device() == q.device() && t.dim() == 1 && t.size(0) == batch && !t.is_floating_point(),
                      "gptext.ops.attention: ", i == 0 ? "kv_starts" : "kv_lens", " must be an integer (", batch,
                      ",) tensor on ", q.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
    *targets[i] = t.to(at::kInt).contiguous();
  }
  p.q = last_dim_contiguous(q);
  p.k = last_dim_contiguous(k);
  p.v = last_dim_contiguous(v);
  p.out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  p.lse = at::empty({batch, heads, q.size(2)}, q.options().dtype(at::kFloat));
  AttentionArgs& a = p.args;
  a = AttentionArgs{};
  a.q = p.q.data_ptr();
  a.k = p.k.data_ptr();
  a.v = p.v.data_ptr();
  a.out = p.out.data_ptr();
  a.lse = p.lse.data_ptr<float>();
  a.sinks = p.sinks.defined() ? p.sinks.data_ptr<float>() : nullptr;
  a.kv_starts = p.kv_starts.defined() ? p.kv_starts.data_ptr<int32_t>() : nullptr;
  a.kv_lens = p.kv_lens.defined() ? p.kv_lens.data_ptr<int32_t>() : nullptr;
  a.batch = batch;
  a.heads = heads;
  a.kv_heads = k.size(1);
  a.q_len = q.size(2);
  a.k_len = k.size(2);
  a.head_dim = q.size(3);
  set_strides(a.q_stride, p.q);
  set_strides(a.k_stride, p.k);
  set_strides(a.v_stride, p.v);
  set_strides(a.out_stride, p.out);
  a.scale = float(scale);
  a.causal = causal;
  a.window = window;
  return p;
}

// The backward's inputs beyond the forward's, and the parts computed with ATen on either
// device: delta = rowsum(grad_out * out) and the sinks' gradient,
// d loss / d sink_h = -sum over (b, t) of exp(sink_h - lse) * delta.
struct AttentionGradProblem {
  AttentionProblem fwd;
  at::Tensor grad_out, delta, grad_q, grad_k, grad_v, grad_sinks;
  AttentionGradArgs args;
};

inline AttentionGradProblem attention_grad_problem(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                   bool causal, int64_t window, const std::optional<at::Tensor>& sinks,
                                                   double scale, const std::optional<at::Tensor>& kv_starts,
                                                   const std::optional<at::Tensor>& kv_lens) {
  AttentionGradProblem g;
  g.fwd = attention_problem(q, k, v, causal, window, sinks, scale, kv_starts, kv_lens);
  check_same(grad_out, q, "attention_backward", "grad_out", "q");
  check_shape(grad_out, q.sizes(), "attention_backward", "grad_out");
  check_shape(out, q.sizes(), "attention_backward", "out");
  check_shape(lse, g.fwd.lse.sizes(), "attention_backward", "lse");
  g.fwd.out = out;
  g.fwd.lse = lse.to(at::kFloat).contiguous();
  g.grad_out = last_dim_contiguous(grad_out);
  g.delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  g.grad_q = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  g.grad_k = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  g.grad_v = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  // A sink's gradient: minus its probability times delta, summed over the rows. A row that sees
  // nothing, not even its sink (-inf), has lse -inf and a sink probability of 0, not NaN.
  if (g.fwd.sinks.defined()) {
    const at::Tensor p_sink = (g.fwd.sinks.view({1, -1, 1}) - g.fwd.lse).exp();
    g.grad_sinks = -(at::where(g.fwd.lse == -INFINITY, 0.0, p_sink) * g.delta).sum(at::IntArrayRef{0, 2});
  } else {
    g.grad_sinks = at::empty({0}, q.options().dtype(at::kFloat));
  }
  g.args = AttentionGradArgs{};
  g.args.fwd = g.fwd.args;
  g.args.fwd.out = nullptr;  // the kernels read delta instead
  g.args.fwd.lse = g.fwd.lse.data_ptr<float>();
  g.args.grad_out = g.grad_out.data_ptr();
  set_strides(g.args.grad_out_stride, g.grad_out);
  g.args.delta = g.delta.data_ptr<float>();
  g.args.grad_q = g.grad_q.data_ptr();
  g.args.grad_k = g.grad_k.data_ptr();
  g.args.grad_v = g.grad_v.data_ptr();
  return g;
}

inline void check_ffn_shapes(const at::Tensor& x, const at::Tensor& w_fc, const at::Tensor& w_proj) {
  TORCH_CHECK_VALUE(w_fc.dim() == 2 && w_proj.dim() == 2, "gptext.ops.ffn: w_fc and w_proj must be 2-d, got ",
                    w_fc.sizes(), " and ", w_proj.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && w_fc.size(1) == x.size(-1) && w_proj.size(0) == x.size(-1) &&
                        w_proj.size(1) == w_fc.size(0),
                    "gptext.ops.ffn: expected w_fc [hidden, ", x.dim() >= 1 ? x.size(-1) : 0, "] and w_proj [",
                    x.dim() >= 1 ? x.size(-1) : 0, ", hidden], got ", w_fc.sizes(), " and ", w_proj.sizes());
}

}  // namespace gptext
