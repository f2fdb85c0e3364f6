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

// ---- LayerNorm -----------------------------------------------------------------------
struct NormProblem {
  at::Tensor x, residual, weight, bias;  // contiguous; residual/bias undefined when absent
  at::Tensor out, sum, mean, rstd;
  DType dtype;
  NormArgs args;
};

inline NormProblem norm_problem(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps) {
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
  p.mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  p.rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  p.args = NormArgs{p.x.data_ptr(),
                    p.residual.defined() ? p.residual.data_ptr() : nullptr,
                    p.weight.data_ptr(),
                    p.bias.defined() ? p.bias.data_ptr() : nullptr,
                    p.out.data_ptr(),
                    p.sum.defined() ? p.sum.data_ptr() : nullptr,
                    p.mean.data_ptr<float>(),
                    p.rstd.data_ptr<float>(),
                    rows_of(p.x),
                    cols,
                    float(eps)};
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

inline void check_ffn_shapes(const at::Tensor& x, const at::Tensor& w_fc, const at::Tensor& w_proj) {
  TORCH_CHECK_VALUE(w_fc.dim() == 2 && w_proj.dim() == 2, "gptext.ops.ffn: w_fc and w_proj must be 2-d, got ",
                    w_fc.sizes(), " and ", w_proj.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && w_fc.size(1) == x.size(-1) && w_proj.size(0) == x.size(-1) &&
                        w_proj.size(1) == w_fc.size(0),
                    "gptext.ops.ffn: expected w_fc [hidden, ", x.dim() >= 1 ? x.size(-1) : 0, "] and w_proj [",
                    x.dim() >= 1 ? x.size(-1) : 0, ", hidden], got ", w_fc.sizes(), " and ", w_proj.sizes());
}

}  // namespace gptext
