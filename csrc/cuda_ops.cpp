// CUDA implementations of gptext's ops: tensor checks (ops_common.h), then the kernel
// launchers of csrc/kernels/launch.h on the current stream. Built only when the extension is
// compiled with CUDA.
//
// `linear` has two GEMM implementations, chosen by the GEMM policy (gptext.set_gemm_policy or
// GPTEXT_GEMM): "wmma", gptext's Tensor Core kernel with its fused epilogue, in whichever of
// its block tiles measured fastest for the shape; "cublas", the product through ATen's
// cuBLAS/cuBLASLt calls (bias, and bias+GELU/ReLU, fused by cuBLASLt where ATen can) and
// gptext's epilogue kernel for the rest; "auto", the fastest of cuBLAS and the WMMA tiles.
// Measurements are taken once per device, dtype, policy and shape class, then cached; while
// a CUDA graph is being captured an unmeasured shape takes cuBLAS ("auto") or the default
// tile ("wmma"). fp32 always takes cuBLAS (TF32 only if
// torch.backends.cuda.matmul.allow_tf32 is set).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/launch.h"
#include "ops_common.h"

namespace gptext {
namespace {

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "gptext.ops.", op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// ---- softmax and LayerNorm -------------------------------------------------------------

at::Tensor softmax_cuda(const at::Tensor& x, int64_t dim, double scale, bool causal, int64_t window) {
  const c10::cuda::CUDAGuard guard(x.device());
  SoftmaxProblem p = softmax_problem(x, dim, scale, causal, window);
  check_cuda(kernels::softmax_forward(p.args, p.dtype, current_stream()), "softmax");
  return softmax_result(p);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                      int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyProblem p = cross_entropy_forward_problem(logits, targets, ignore_index);
  check_cuda(kernels::cross_entropy_forward(p.args, p.dtype, current_stream()), "cross_entropy");
  return {p.loss, p.lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                       const at::Tensor& lse, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyProblem p = cross_entropy_backward_problem(grad, logits, targets, lse, ignore_index);
  check_cuda(kernels::cross_entropy_backward(p.args, p.dtype, current_stream()), "cross_entropy_backward");
  return p.dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormProblem p = norm_problem("layernorm", x, std::nullopt, weight, bias, eps);
  check_cuda(kernels::layernorm_forward(p.args, p.dtype, current_stream()), "layernorm");
  return {p.out, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_residual_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormProblem p = norm_problem("layernorm_residual", x, residual, weight, bias, eps);
  check_cuda(kernels::layernorm_forward(p.args, p.dtype, current_stream()), "layernorm_residual");
  return {p.out, p.sum, p.mean, p.rstd};
}

// RMSNorm runs on the LayerNorm kernels (NormArgs::rms).
std::tuple<at::Tensor, at::Tensor> rmsnorm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormProblem p = norm_problem("rmsnorm", x, std::nullopt, weight, std::nullopt, eps, /*rms=*/true);
  check_cuda(kernels::layernorm_forward(p.args, p.dtype, current_stream()), "rmsnorm");
  return {p.out, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_residual_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                     const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormProblem p = norm_problem("rmsnorm_residual", x, residual, weight, std::nullopt, eps, /*rms=*/true);
  check_cuda(kernels::layernorm_forward(p.args, p.dtype, current_stream()), "rmsnorm_residual");
  return {p.out, p.sum, p.rstd};
}

// ---- linear: the two GEMM paths and the policy between them ------------------------------

// One way to compute linear's product: cuBLAS, or gptext's WMMA kernel with a block tile.
struct GemmChoice {
  bool wmma;
  GemmTile tile;  // for wmma
};
constexpr GemmChoice kCublas{false, GemmTile::Large};

const char* impl_name(GemmChoice choice) { return choice.wmma ? "wmma" : "cublas"; }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

void run_wmma(const LinearProblem& p, const at::Tensor& out, GemmTile tile) {
  GemmArgs args = p.args;
  args.c = out.data_ptr();
  check_cuda(kernels::gemm_wmma(args, p.dtype, tile, current_stream()), "linear");
}

void run_cublas(const LinearProblem& p, at::Tensor& out) {
  const at::Tensor weight_t = p.weight.t();
  GemmArgs rest = p.args;  // what cuBLAS(Lt) leaves to gptext's epilogue kernel
  rest.c = out.data_ptr();
  if (p.bias.defined()) {
    if (p.args.act == Activation::None) {
      at::addmm_out(out, p.bias, p.x2d, weight_t);
    } else {
      // ATen fuses bias + GELU (tanh form) or ReLU into cuBLASLt when it can, else applies them.
      at::_addmm_activation_out(out, p.bias, p.x2d, weight_t, 1, 1, p.args.act == Activation::Gelu);
    }
    rest.bias = nullptr;
    rest.act = Activation::None;
  } else {
    at::mm_out(out, p.x2d, weight_t);
  }
  check_cuda(kernels::gemm_epilogue(rest, p.dtype, current_stream()), "linear");
}

void run_choice(GemmChoice choice, const LinearProblem& p, at::Tensor& out) {
  if (choice.wmma) run_wmma(p, out, choice.tile);
  else run_cublas(p, out);
}

// Shapes that share a measurement: same device, dtype, N and K, and M rounded up to a
// power of two (prefill lengths vary; decode batch sizes stay in small buckets); and the
// policy, which decides what is measured.
struct ShapeClass {
  int device;
  int dtype;
  int policy;
  int64_t m_bucket, n, k;
  bool operator==(const ShapeClass& o) const {
    return device == o.device && dtype == o.dtype && policy == o.policy && m_bucket == o.m_bucket && n == o.n &&
           k == o.k;
  }
};
struct ShapeClassHash {
  size_t operator()(const ShapeClass& s) const {
    size_t h = std::hash<int64_t>()(s.m_bucket);
    for (int64_t v : {int64_t(s.device), int64_t(s.dtype), int64_t(s.policy), s.n, s.k}) {
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    }
    return h;
  }
};

std::mutex g_tuned_mutex;
std::unordered_map<ShapeClass, GemmChoice, ShapeClassHash> g_tuned;

ShapeClass shape_class(const LinearProblem& p, const at::Tensor& x, GemmPolicy policy) {
  return {x.get_device(), int(p.dtype), int(policy), next_pow2(std::max<int64_t>(p.args.m, 1)), p.args.n, p.args.k};
}

bool wmma_supported(const LinearProblem& p, const at::Tensor& x) {
  if (p.dtype == DType::F32) return false;
  return at::cuda::getDeviceProperties(x.get_device())->major >= 8;
}

// Median time of a few runs of one implementation, in milliseconds.
float time_choice(GemmChoice choice, const LinearProblem& p, at::Tensor& out) {
  constexpr int kRuns = 5;
  run_choice(choice, p, out);  // warm-up: first-use costs (cuBLAS handles, smem opt-in) excluded
  std::array<float, kRuns> ms{};
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "linear");
  check_cuda(cudaEventCreate(&stop), "linear");
  for (float& t : ms) {
    check_cuda(cudaEventRecord(start, current_stream()), "linear");
    run_choice(choice, p, out);
    check_cuda(cudaEventRecord(stop, current_stream()), "linear");
    check_cuda(cudaEventSynchronize(stop), "linear");
    check_cuda(cudaEventElapsedTime(&t, start, stop), "linear");
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[kRuns / 2];
}

// The implementation the policy picks: "cublas"; "wmma", the WMMA tile that measured
// fastest; "auto", the fastest of cuBLAS and the WMMA tiles. With `out` given, an untuned
// shape class is measured (the timing runs write `out`, which the caller then overwrites);
// without it, or while a CUDA graph is being captured, an untuned class gets what an
// unmeasured call uses: cuBLAS for "auto", the default tile for "wmma".
GemmChoice choose_gemm(const LinearProblem& p, const at::Tensor& x, at::Tensor* out) {
  const GemmPolicy policy = gemm_policy();
  if (!wmma_supported(p, x) || policy == GemmPolicy::Cublas) return kCublas;
  const GemmChoice unmeasured = policy == GemmPolicy::Wmma
                                    ? GemmChoice{true, gemm_default_tile(p.args.m, p.args.n, sm_count())}
                                    : kCublas;
  const ShapeClass key = shape_class(p, x, policy);
  {
    std::lock_guard<std::mutex> lock(g_tuned_mutex);
    const auto it = g_tuned.find(key);
    if (it != g_tuned.end()) return it->second;
  }
  if (out == nullptr || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return unmeasured;
  }
  // The unmeasured choice first, then every WMMA tile not already among the candidates.
  std::vector<GemmChoice> candidates = {unmeasured};
  for (int t = 0; t < kGemmTiles; ++t) {
    if (!(unmeasured.wmma && unmeasured.tile == GemmTile(t))) candidates.push_back({true, GemmTile(t)});
  }
  GemmChoice best = unmeasured;
  float best_ms = INFINITY;
  for (const GemmChoice& candidate : candidates) {
    const float ms = time_choice(candidate, p, *out);
    if (ms < best_ms) {
      best = candidate;
      best_ms = ms;
    }
  }
  std::lock_guard<std::mutex> lock(g_tuned_mutex);
  g_tuned[key] = best;
  return best;
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::string& activation, const std::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(x.device());
  LinearProblem p = linear_problem("linear", x, weight, bias, activation, residual);
  if (p.args.k == 0) {  // an empty sum: the product is zeros, and the epilogue still applies
    at::Tensor out = at::zeros({p.args.m, p.args.n}, p.x2d.options());
    GemmArgs args = p.args;
    args.c = out.data_ptr();
    check_cuda(kernels::gemm_epilogue(args, p.dtype, current_stream()), "linear");
    return out.view(p.out_shape);
  }
  at::Tensor out = at::empty({p.args.m, p.args.n}, p.x2d.options());
  run_choice(choose_gemm(p, x, &out), p, out);
  return out.view(p.out_shape);
}

at::Tensor ffn_cuda(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                    const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                    const std::optional<at::Tensor>& residual) {
  check_ffn_shapes(x, w_fc, w_proj);
  const at::Tensor hidden = linear_cuda(x, w_fc, b_fc, "gelu", std::nullopt);
  return linear_cuda(hidden, w_proj, b_proj, "none", residual);
}

std::string linear_backend_cuda(const at::Tensor& x, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearProblem p = linear_problem("linear", x, weight, std::nullopt, "none", std::nullopt);
  return impl_name(choose_gemm(p, x, nullptr));
}

// ---- attention ---------------------------------------------------------------------------

// The tensor-core tiles are filled with 16-byte copies: a row must start 16-byte aligned.
bool rows_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0;
}

void align_rows(at::Tensor& t, const void*& ptr, int64_t (&stride)[3]) {
  if (rows_aligned(t)) return;
  t = t.contiguous();
  ptr = t.data_ptr();
  set_strides(stride, t);
}

void check_fused(const AttentionArgs& args, DType dtype) {
  TORCH_CHECK_VALUE(kernels::attention_supported(args, dtype), "gptext.ops.attention: the fused CUDA kernels take "
                    "bfloat16 or float16 with head_dim 64 or 128, got head_dim ", args.head_dim,
                    dtype == DType::F32 ? " in float32" : "");
}

// RoPE: one kernel, 128-bit accesses where the strides allow. Unverified on a GPU so far.
at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const c10::cuda::CUDAGuard guard(x.device());
  RopeProblem p = rope_problem(x, cos, sin);
  check_cuda(kernels::rope_forward(p.args, p.dtype, current_stream()), "rope");
  return p.out;
}

// Expert linear layers, in either form and without reading anything back to the host
// (graph-capturable). Few routes: the expert_linear kernel, one warp per few output columns
// of a route. Many routes (expert_routes_grouped), in bf16/fp16 on sm_80+: the routes sorted
// by expert here on the device, then the grouped WMMA GEMM (expert_linear_grouped). fp32
// stays on the per-route kernel at any size. Unverified on a GPU so far.
at::Tensor expert_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& experts, const std::string& activation, double limit) {
  const c10::cuda::CUDAGuard guard(x.device());
  ExpertProblem p = expert_problem(x, weight, bias, experts, activation, limit);
  const ExpertArgs& a = p.args;
  const bool grouped = expert_routes_grouped(a) && a.n > 0 && p.dtype != DType::F32 &&
                       at::cuda::getDeviceProperties(x.get_device())->major >= 8;
  if (!grouped) {
    check_cuda(kernels::expert_linear_forward(a, p.dtype, current_stream()), "expert_linear");
    return p.out;
  }
  // Bucket e < num_experts: expert e's routes; bucket num_experts: indices out of range.
  const at::Tensor ids = p.experts.view(-1);
  const at::Tensor buckets = at::where((ids < 0).logical_or(ids >= a.num_experts), a.num_experts, ids);
  const at::Tensor order = std::get<1>(at::sort(buckets, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts =
      at::zeros({a.num_experts + 1}, ids.options()).index_add_(0, buckets, at::ones_like(buckets));
  const at::Tensor offsets = at::cat({at::zeros({1}, ids.options()), counts.cumsum(0)}).contiguous();
  check_cuda(kernels::expert_linear_grouped(a, order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), p.dtype,
                                            current_stream()),
             "expert_linear");
  return p.out;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  bool causal, int64_t window, const std::optional<at::Tensor>& sinks,
                                                  double scale, const std::optional<at::Tensor>& kv_starts,
                                                  const std::optional<at::Tensor>& kv_lens) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionProblem p = attention_problem(q, k, v, causal, window, sinks, scale, kv_starts, kv_lens);
  AttentionArgs& a = p.args;
  check_fused(a, p.dtype);
  align_rows(p.q, a.q, a.q_stride);
  align_rows(p.k, a.k, a.k_stride);
  align_rows(p.v, a.v, a.v_stride);
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  kernels::AttentionPlan plan =
      kernels::attention_forward_plan(a, props->multiProcessorCount, int64_t(props->sharedMemPerMultiprocessor));
  at::Tensor partial_out, partial_lse;  // the split-KV workspace
  if (plan.splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    partial_out = at::empty({plan.splits, a.batch, a.heads, a.q_len, a.head_dim}, f32);
    partial_lse = at::empty({plan.splits, a.batch, a.heads, a.q_len}, f32);
    plan.out = partial_out.data_ptr<float>();
    plan.lse = partial_lse.data_ptr<float>();
  }
  check_cuda(kernels::attention_forward(a, p.dtype, plan, current_stream()), "attention");
  return {p.out, p.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool causal, int64_t window, const std::optional<at::Tensor>& sinks, double scale,
    const std::optional<at::Tensor>& kv_starts, const std::optional<at::Tensor>& kv_lens) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttentionGradProblem g = attention_grad_problem(grad_out, q, k, v, out, lse, causal, window, sinks, scale, kv_starts,
                                                  kv_lens);
  AttentionArgs& a = g.args.fwd;
  check_fused(a, g.fwd.dtype);
  align_rows(g.fwd.q, a.q, a.q_stride);
  align_rows(g.fwd.k, a.k, a.k_stride);
  align_rows(g.fwd.v, a.v, a.v_stride);
  align_rows(g.grad_out, g.args.grad_out, g.args.grad_out_stride);
  if (a.q_len == 0 || a.batch == 0) {  // nothing attends: the kernels write no key gradient
    g.grad_k.zero_();
    g.grad_v.zero_();
  }
  check_cuda(kernels::attention_backward(g.args, g.fwd.dtype, current_stream()), "attention_backward");
  return {g.grad_q, g.grad_k, g.grad_v, g.grad_sinks};
}

int64_t cuda_binary_arch(int64_t device) { return kernels::kernels_binary_arch(int(device)); }

}  // namespace
}  // namespace gptext

TORCH_LIBRARY_FRAGMENT(gptext, m) {
  // The compute capability of the kernel binary that runs on `device` (0: none can).
  m.def("_cuda_binary_arch(int device) -> int", &gptext::cuda_binary_arch);
}

TORCH_LIBRARY_IMPL(gptext, CUDA, m) {
  m.impl("softmax", &gptext::softmax_cuda);
  m.impl("cross_entropy", &gptext::cross_entropy_cuda);
  m.impl("cross_entropy_backward", &gptext::cross_entropy_backward_cuda);
  m.impl("layernorm", &gptext::layernorm_cuda);
  m.impl("layernorm_residual", &gptext::layernorm_residual_cuda);
  m.impl("rmsnorm", &gptext::rmsnorm_cuda);
  m.impl("rmsnorm_residual", &gptext::rmsnorm_residual_cuda);
  m.impl("linear", &gptext::linear_cuda);
  m.impl("ffn", &gptext::ffn_cuda);
  m.impl("rope", &gptext::rope_cuda);
  m.impl("expert_linear", &gptext::expert_linear_cuda);
  m.impl("attention", &gptext::attention_cuda);
  m.impl("attention_backward", &gptext::attention_backward_cuda);
  m.impl("_linear_backend", &gptext::linear_backend_cuda);
}
