// gptext's op library: every schema and the CPU implementations. The CUDA implementations
// register in cuda_ops.cpp when the extension is built with CUDA; the Python module that
// loads them, with a fast entry point per op, is python_module.cpp. Autograd formulas and
// fake (meta) implementations are registered from Python (gptext/ops.py).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "cpu/cpu_kernels.h"
#include "ops_common.h"

#ifdef GPTEXT_WITH_CUDA
#include "kernels/launch.h"
#endif

#ifndef GPTEXT_CUDA_ARCHES
#define GPTEXT_CUDA_ARCHES ""
#endif

namespace gptext {

// ---- GEMM policy -----------------------------------------------------------------------
namespace {
GemmPolicy policy_from_environment() {
  const char* env = std::getenv("GPTEXT_GEMM");
  return env == nullptr ? GemmPolicy::Auto : parse_gemm_policy(env);
}
std::atomic<int> g_gemm_policy{-1};  // -1: not read from the environment yet
}  // namespace

GemmPolicy parse_gemm_policy(const std::string& name) {
  if (name == "auto") return GemmPolicy::Auto;
  if (name == "wmma") return GemmPolicy::Wmma;
  if (name == "cublas") return GemmPolicy::Cublas;
  TORCH_CHECK_VALUE(false, "gptext: GEMM policy must be 'auto', 'wmma' or 'cublas', got '", name, "'");
}

const char* gemm_policy_name(GemmPolicy policy) {
  switch (policy) {
    case GemmPolicy::Wmma:
      return "wmma";
    case GemmPolicy::Cublas:
      return "cublas";
    default:
      return "auto";
  }
}

GemmPolicy gemm_policy() {
  int value = g_gemm_policy.load();
  if (value < 0) {
    value = int(policy_from_environment());
    g_gemm_policy.store(value);
  }
  return GemmPolicy(value);
}

namespace {

void set_gemm_policy(const std::string& name) { g_gemm_policy.store(int(parse_gemm_policy(name))); }
std::string get_gemm_policy() { return gemm_policy_name(gemm_policy()); }

// Output columns a block of the ATen GEMM's products (linear_column_blocks_cpu).
constexpr int64_t kGemmColumnBlock = 1024;

// The block linear_column_blocks_cpu uses: kGemmColumnBlock, or the environment variable
// GPTEXT_CPU_GEMM_BLOCK (0: one call for the whole product; read once).
int64_t gemm_column_block() {
  static const int64_t block = cpu::env_integer("GPTEXT_CPU_GEMM_BLOCK", 0, kGemmColumnBlock);
  return block;
}

// One JSON object describing the build, read by gptext.build_info().
std::string build_info() {
  std::string info = "{\"cpu_isa\": \"";
  info += cpu::isa_name(cpu::active_isa());
  info += "\", \"cpu_isa_supported\": \"";
  info += cpu::isa_name(cpu::supported_isa());
  info += "\", \"cpu_bf16_gemm\": \"";
  info += cpu::bf16_dot_product() ? "bf16" : "fp32";
  info += "\", \"cpu_f16_gemm\": \"";
  info += cpu::fp16_arithmetic() ? "fp16" : "fp32";
  info += "\", \"cpu_amx\": ";
  info += cpu::amx_bf16() ? "true" : "false";
  info += ", \"cpu_stream_bytes\": ";
  info += std::to_string(cpu::stream_min_traffic());
  info += ", \"cpu_gemm_column_block\": ";
  info += std::to_string(gemm_column_block());
  info += ", \"";
#ifdef GPTEXT_WITH_CUDA
  info += "cuda\": true, \"cuda_arch_list\": \"" GPTEXT_CUDA_ARCHES "\", \"cuda_runtime\": ";
  info += std::to_string(kernels::kernels_cuda_version());
  info += "}";
#else
  info += "cuda\": false, \"cuda_arch_list\": \"\", \"cuda_runtime\": 0}";
#endif
  return info;
}

// Splits rows over the intra-op thread pool so that each task has at least ~16K elements.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t cols, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// ---- CPU implementations ---------------------------------------------------------------

at::Tensor softmax_cpu(const at::Tensor& x, int64_t dim, double scale, bool causal, int64_t window) {
  SoftmaxProblem p = softmax_problem(x, dim, scale, causal, window);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::softmax_rows(p.dtype, p.args, begin, end); });
  return softmax_result(p);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                     int64_t ignore_index) {
  CrossEntropyProblem p = cross_entropy_forward_problem(logits, targets, ignore_index);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::cross_entropy_rows(p.dtype, p.args, begin, end); });
  return {p.loss, p.lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                      const at::Tensor& lse, int64_t ignore_index) {
  CrossEntropyProblem p = cross_entropy_backward_problem(grad, logits, targets, lse, ignore_index);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::cross_entropy_backward_rows(p.dtype, p.args, begin, end); });
  return p.dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias, double eps) {
  NormProblem p = norm_problem("layernorm", x, std::nullopt, weight, bias, eps);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::layernorm_rows(p.dtype, p.args, begin, end); });
  return {p.out, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_residual_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  NormProblem p = norm_problem("layernorm_residual", x, residual, weight, bias, eps);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::layernorm_rows(p.dtype, p.args, begin, end); });
  return {p.out, p.sum, p.mean, p.rstd};
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  NormProblem p = norm_problem("rmsnorm", x, std::nullopt, weight, std::nullopt, eps, /*rms=*/true);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::layernorm_rows(p.dtype, p.args, begin, end); });
  return {p.out, p.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rmsnorm_residual_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                    const at::Tensor& weight, double eps) {
  NormProblem p = norm_problem("rmsnorm_residual", x, residual, weight, std::nullopt, eps, /*rms=*/true);
  parallel_rows(p.args.rows, p.args.cols,
                [&](int64_t begin, int64_t end) { cpu::layernorm_rows(p.dtype, p.args, begin, end); });
  return {p.out, p.sum, p.rstd};
}

// Up to this many rows a bf16 product runs on gptext's AMX GEMM (cpu::gemm_amx) where
// amx_bf16() holds, past the skinny GEMM's rows; more go to oneDNN's (ATen's, also on AMX).
// Against F.linear in rounds on an Intel Xeon (2 threads), x768->2304: 1.8-2.2x at 17-32
// rows, 1.3-1.5x at 128 (128x768->50257 1.3-1.5x), 0.97-1.14x at 512, and 0.85-0.96x at
// 2048x768->3072, where oneDNN's blocking for the cache does better.
constexpr int64_t kAmxGemmMaxRows = 512;

// ATen's GEMM a block of kGemmColumnBlock output columns at a time (the same number of
// weight rows, converted to fp32 where they are stored in 16 bits), into one fp32 buffer of
// rows x block that stays in the cache, whose sums gptext's epilogue then writes into the
// output's columns (bias, activation, residual, the rounding to the storage type). One call
// over the whole product instead writes its fp32 output through memory (the GPT-2 head of
// 2048 rows: 412 MB, freshly mapped pages that fault in mid-GEMM) and, in 16 bits, converts
// the whole weight and the whole output in passes of their own. Measured on an AMD EPYC
// (Zen 3, AVX2 only, 2 threads; MKL's GEMM), three rounds of alternating processes, one
// call -> blocks of 1024: 2048x768->50257 fp32 2.05-2.35 s -> 1.71-1.78 s, bf16 2.28-2.48 s
// -> 1.57-1.62 s; 128x768->50257 fp32 165-240 ms -> 92-124 ms, bf16 274-324 ms -> 87-127
// ms; 512x768->2304 fp32 18.7-22.8 ms -> 14.1-16.5 ms; 2048x768->3072 +b+gelu about even
// (75-113 ms against 88-97 ms); blocks of 512 or 2048 did worse than 1024. GPT-2 124M
// prefill there, fp32: 1x128 255-303 -> 363-393 tokens/s.
at::Tensor linear_column_blocks_cpu(const LinearProblem& p, int64_t block) {
  const int64_t m = p.args.m, n = p.args.n, k = p.args.k;
  at::Tensor out = at::empty({m, n}, p.x2d.options());
  const at::Tensor x = p.x2d.to(at::kFloat);
  const bool convert = p.weight.scalar_type() != at::kFloat;
  at::Tensor sums = at::empty({m * block}, x.options());
  at::Tensor weights = convert ? at::empty({block * k}, x.options()) : at::Tensor();
  GemmArgs args = p.args;
  args.c = out.data_ptr();
  for (int64_t n0 = 0; n0 < n; n0 += block) {
    const int64_t width = std::min(block, n - n0);
    at::Tensor w = p.weight.narrow(0, n0, width);
    if (convert) w = weights.narrow(0, 0, width * k).view({width, k}).copy_(w);
    at::Tensor s = sums.narrow(0, 0, m * width).view({m, width});
    at::mm_out(s, x, w.t());
    const float* sums_ptr = s.data_ptr<float>();
    parallel_rows(m, width, [&](int64_t begin, int64_t end) {
      cpu::epilogue_block(p.dtype, args, sums_ptr, width, n0, width, begin, end);
    });
  }
  return out.view(p.out_shape);
}

// Few rows (decode): gptext's skinny GEMM, which streams the weight once with the whole
// epilogue fused, split over threads by output column. In bf16 with AMX, up to
// kAmxGemmMaxRows rows: gptext's AMX GEMM, the same way. More rows: ATen's CPU GEMM (MKL /
// oneDNN / OpenBLAS), with gptext's epilogue for the bias, activation and residual: in
// column blocks (linear_column_blocks_cpu) where there are more than kGemmColumnBlock
// output columns and the GEMM runs in fp32, else in one call (the bias folded in) and the
// epilogue in place. That GEMM runs in fp32 whatever the storage type (ATen's
// 16-bit CPU GEMM is far slower where the CPU has no 16-bit arithmetic), and the result is
// rounded once, at the end; except where the processor computes in the storage type (bf16
// dot products, fp16 arithmetic: cpu_kernels.h), whose GEMM then runs in it (fp32
// accumulation, the product rounded before the epilogue, as eager PyTorch rounds it): 3x
// faster than in fp32 at 512x768->2304 in bf16 on Zen 4, 2x at 16x768->3072 in fp16 on a
// Xeon.
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::string& activation, const std::optional<at::Tensor>& residual) {
  LinearProblem p = linear_problem("linear", x, weight, bias, activation, residual);
  const bool native = (p.dtype == DType::BF16 && cpu::bf16_dot_product()) ||
                      (p.dtype == DType::F16 && cpu::fp16_arithmetic());
  const int64_t skinny_rows = !native                   ? cpu::kSkinnyMaxRows
                              : p.dtype == DType::BF16 ? (cpu::amx_bf16() ? cpu::kSkinnyMaxRowsAmx
                                                                          : cpu::kSkinnyMaxRowsNativeBf16)
                                                       : cpu::kSkinnyMaxRowsNativeF16;
  if (p.dtype == DType::BF16 && cpu::amx_bf16() && p.args.m > skinny_rows && p.args.m <= kAmxGemmMaxRows) {
    // The rows packed once (blocks over threads), then the output columns over threads in
    // the GEMM's column blocks.
    at::Tensor out = at::empty({p.args.m, p.args.n}, p.x2d.options());
    at::Tensor packed = at::empty({cpu::amx_packed_size(p.args.m, p.args.k)}, p.x2d.options().dtype(at::kInt));
    GemmArgs args = p.args;
    args.c = out.data_ptr();
    auto* rows = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
    constexpr int64_t kRows = cpu::kAmxRowBlock, kCols = cpu::kAmxColBlock;
    at::parallel_for(0, (args.m + kRows - 1) / kRows, 1,
                     [&](int64_t begin, int64_t end) { cpu::amx_pack_rows(args, rows, begin, end); });
    at::parallel_for(0, (args.n + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      cpu::gemm_amx(args, rows, begin * kCols, std::min(end * kCols, args.n));
    });
    return out.view(p.out_shape);
  }
  if (p.args.m <= skinny_rows) {
    at::Tensor out = at::empty({p.args.m, p.args.n}, p.x2d.options());
    GemmArgs args = p.args;
    args.c = out.data_ptr();
    const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(args.k * args.m, 1));
    at::parallel_for(0, args.n, grain, [&](int64_t begin, int64_t end) { cpu::skinny_gemm(p.dtype, args, begin, end); });
    return out.view(p.out_shape);
  }
  if (!native && gemm_column_block() > 0 && p.args.n > gemm_column_block()) {
    return linear_column_blocks_cpu(p, gemm_column_block());
  }
  auto compute_type = [native](const at::Tensor& t) { return t.defined() && !native ? t.to(at::kFloat) : t; };
  const at::Tensor xc = compute_type(p.x2d), weightc = compute_type(p.weight), biasc = compute_type(p.bias),
                   residualc = compute_type(p.residual);
  at::Tensor out = biasc.defined() ? at::addmm(biasc, xc, weightc.t()) : at::mm(xc, weightc.t());
  if (p.args.act != Activation::None || residualc.defined()) {
    GemmArgs epilogue = p.args;
    epilogue.c = out.data_ptr();
    epilogue.bias = nullptr;  // already added by addmm
    epilogue.residual = residualc.defined() ? residualc.data_ptr() : nullptr;
    parallel_rows(epilogue.m, epilogue.n, [&](int64_t begin, int64_t end) {
      cpu::epilogue_rows(native ? p.dtype : DType::F32, epilogue, begin, end);
    });
  }
  return out.to(x.scalar_type()).view(p.out_shape);
}

at::Tensor ffn_cpu(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                   const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                   const std::optional<at::Tensor>& residual) {
  check_ffn_shapes(x, w_fc, w_proj);
  const at::Tensor hidden = linear_cpu(x, w_fc, b_fc, "gelu", std::nullopt);
  return linear_cpu(hidden, w_proj, b_proj, "none", residual);
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RopeProblem p = rope_problem(x, cos, sin);
  const RopeArgs& a = p.args;
  parallel_rows(a.batch * a.heads * a.positions, a.head_dim,
                [&](int64_t begin, int64_t end) { cpu::rope_rows(p.dtype, a, begin, end); });
  return p.out;
}

// h (routes, n): each route's row times its expert's matrix on gptext's skinny GEMM (one
// row, the expert's weights read in place), the routes and blocks of their output columns
// split over threads.
void expert_linear_routed_cpu(const ExpertProblem& p, const at::Tensor& h) {
  const ExpertArgs& a = p.args;
  const int64_t routes = a.tokens * a.slots;
  const int64_t bytes = dtype_size(p.dtype);
  const auto* xs = static_cast<const char*>(a.x);
  const auto* ws = static_cast<const char*>(a.weight);
  const auto* bs = static_cast<const char*>(a.bias);
  auto* hs = static_cast<char*>(h.data_ptr());
  const int64_t block = std::max<int64_t>(16, 65536 / std::max<int64_t>(a.k, 1));
  const int64_t blocks = (a.n + block - 1) / block;
  at::parallel_for(0, routes * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / blocks, n0 = (task % blocks) * block, e = a.experts[r];
      const int64_t row = a.x_per_route ? r : r / a.slots;
      const GemmArgs g{xs + row * a.k * bytes, ws + e * a.n * a.k * bytes, hs + r * a.n * bytes,
                       bs != nullptr ? bs + e * a.n * bytes : nullptr, nullptr, 1, a.n, a.k, a.k, a.k, a.n,
                       Activation::None};
      cpu::skinny_gemm(p.dtype, g, n0, std::min(n0 + block, a.n));
    }
  });
}

// The routes sorted by expert, stably (a counting sort): expert e's routes are
// order[offsets[e] .. offsets[e + 1]). The indices must already be checked.
struct ExpertGroups {
  std::vector<int64_t> order, offsets;
};

ExpertGroups expert_groups(const ExpertArgs& a) {
  const int64_t routes = a.tokens * a.slots;
  ExpertGroups g{std::vector<int64_t>(static_cast<size_t>(routes)),
                 std::vector<int64_t>(static_cast<size_t>(a.num_experts + 1), 0)};
  for (int64_t r = 0; r < routes; ++r) ++g.offsets[a.experts[r] + 1];
  for (int64_t e = 0; e < a.num_experts; ++e) g.offsets[e + 1] += g.offsets[e];
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t r = 0; r < routes; ++r) g.order[next[a.experts[r]]++] = r;
  return g;
}

// h (routes, n): each expert's routes' products, one GEMM per expert.
void expert_linear_grouped_cpu(const ExpertProblem& p, const at::Tensor& h) {
  const ExpertArgs& a = p.args;
  const ExpertGroups groups = expert_groups(a);
  const at::Tensor order = at::from_blob(const_cast<int64_t*>(groups.order.data()),
                                         {int64_t(groups.order.size())}, at::kLong);
  const at::Tensor rows = a.x_per_route ? p.x.view({-1, a.k}) : p.x;
  for (int64_t e = 0; e < a.num_experts; ++e) {
    const int64_t begin = groups.offsets[e], count = groups.offsets[e + 1] - begin;
    if (count == 0) continue;
    const at::Tensor routes = order.narrow(0, begin, count);
    const at::Tensor picked = rows.index_select(0, a.x_per_route ? routes : routes.div(a.slots, "floor"));
    const std::optional<at::Tensor> bias = p.bias.defined() ? std::optional<at::Tensor>(p.bias[e]) : std::nullopt;
    h.index_copy_(0, routes, linear_cpu(picked, p.weight[e], bias, "none", std::nullopt));
  }
}

// The expert linear layers of a mixture of experts (ExpertArgs in args.h), in one of two
// forms chosen by the number of routes (expert_routes_grouped): few (a decode step) route
// by route (expert_linear_routed_cpu); many (a prefill) sorted by expert, each expert one
// GEMM over its routes' gathered rows, so that its matrix is read once per GEMM and not once
// per route (expert_linear_grouped_cpu). With SwiGLU the products are rounded to the storage
// type first, as a linear layer's output is, then paired. Expert indices are checked here
// (the CUDA kernels write NaN rows instead).
at::Tensor expert_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& experts, const std::string& activation, double limit) {
  ExpertProblem p = expert_problem(x, weight, bias, experts, activation, limit);
  const ExpertArgs& a = p.args;
  const int64_t routes = a.tokens * a.slots;
  if (routes == 0 || a.n == 0) return p.out;
  for (int64_t r = 0; r < routes; ++r) {
    TORCH_CHECK_INDEX(a.experts[r] >= 0 && a.experts[r] < a.num_experts, "gptext.ops.expert_linear: experts holds ",
                      a.experts[r], " (token ", r / a.slots, ", slot ", r % a.slots, "), outside [0, ", a.num_experts,
                      ") for a weight of ", a.num_experts, " experts");
  }
  const at::Tensor h = a.swiglu ? at::empty({routes, a.n}, p.x.options()) : p.out;
  if (expert_routes_grouped(a)) {
    expert_linear_grouped_cpu(p, h.view({routes, a.n}));
  } else {
    expert_linear_routed_cpu(p, h);
  }
  const int64_t bytes = dtype_size(p.dtype);
  auto* hs = static_cast<char*>(h.data_ptr());
  if (a.swiglu) {
    auto* out = static_cast<char*>(p.out.data_ptr());
    const int64_t half = a.n / 2;
    at::parallel_for(0, routes, std::max<int64_t>(1, 16384 / a.n), [&](int64_t begin, int64_t end) {
      std::vector<float> pairs(static_cast<size_t>(a.n)), values(static_cast<size_t>(half));
      for (int64_t r = begin; r < end; ++r) {
        cpu::from_storage(p.dtype, hs + r * a.n * bytes, pairs.data(), a.n);
        for (int64_t j = 0; j < half; ++j) values[j] = swiglu_clamped(pairs[2 * j], pairs[2 * j + 1], a.limit);
        cpu::to_storage(p.dtype, values.data(), out + r * half * bytes, half);
      }
    });
  }
  return p.out;
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, int64_t window, const std::optional<at::Tensor>& sinks,
                                                 double scale, const std::optional<at::Tensor>& kv_starts,
                                                 const std::optional<at::Tensor>& kv_lens) {
  AttentionProblem p = attention_problem(q, k, v, causal, window, sinks, scale, kv_starts, kv_lens);
  const AttentionArgs& a = p.args;
  const int64_t tasks = cpu::attention_forward_tasks(a);
  const int64_t rows_per_task = cpu::attention_forward_blocked_rows(a) ? cpu::attention_forward_row_block(a) : 1;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(rows_per_task * a.k_len * a.head_dim, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { cpu::attention_forward(p.dtype, a, begin, end); });
  return {p.out, p.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool causal, int64_t window, const std::optional<at::Tensor>& sinks, double scale,
    const std::optional<at::Tensor>& kv_starts, const std::optional<at::Tensor>& kv_lens) {
  AttentionGradProblem g = attention_grad_problem(grad_out, q, k, v, out, lse, causal, window, sinks, scale, kv_starts,
                                                  kv_lens);
  at::parallel_for(0, g.args.fwd.batch * g.args.fwd.kv_heads, 1, [&](int64_t begin, int64_t end) {
    cpu::attention_backward(g.fwd.dtype, g.args, begin, end);
  });
  return {g.grad_q, g.grad_k, g.grad_v, g.grad_sinks};
}

std::string linear_backend_cpu(const at::Tensor&, const at::Tensor&) { return "cpu"; }

}  // namespace
}  // namespace gptext

TORCH_LIBRARY(gptext, m) {
  m.def("softmax(Tensor x, int dim=-1, float scale=1.0, bool causal=False, int window=0) -> Tensor");
  m.def("cross_entropy(Tensor logits, Tensor targets, int ignore_index=-100) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_backward(Tensor grad, Tensor logits, Tensor targets, Tensor lse, int ignore_index) -> "
      "Tensor");
  m.def("layernorm(Tensor x, Tensor weight, Tensor? bias, float eps=1e-05) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layernorm_residual(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps=1e-05) -> "
      "(Tensor out, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("rmsnorm(Tensor x, Tensor weight, float eps=1e-05) -> (Tensor out, Tensor rstd)");
  m.def("rmsnorm_residual(Tensor x, Tensor residual, Tensor weight, float eps=1e-05) -> (Tensor out, Tensor sum, Tensor rstd)");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, str activation=\"none\", Tensor? residual=None) -> Tensor");
  m.def(
      "ffn(Tensor x, Tensor w_fc, Tensor? b_fc, Tensor w_proj, Tensor? b_proj, Tensor? residual=None) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def(
      "expert_linear(Tensor x, Tensor weight, Tensor? bias, Tensor experts, str activation=\"none\", "
      "float limit=7.0) -> Tensor");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, bool causal=True, int window=0, Tensor? sinks=None, float scale=1.0, "
      "Tensor? kv_starts=None, Tensor? kv_lens=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
      "int window, Tensor? sinks, float scale, Tensor? kv_starts, Tensor? kv_lens) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_sinks)");
  // Which GEMM implementation `linear` would use for these operands ("wmma", "cublas", "cpu").
  m.def("_linear_backend(Tensor x, Tensor weight) -> str");
  m.def("_build_info() -> str", &gptext::build_info);
  m.def("_set_gemm_policy(str policy) -> ()", &gptext::set_gemm_policy);
  m.def("_gemm_policy() -> str", &gptext::get_gemm_policy);
}

TORCH_LIBRARY_IMPL(gptext, CPU, m) {
  m.impl("softmax", &gptext::softmax_cpu);
  m.impl("cross_entropy", &gptext::cross_entropy_cpu);
  m.impl("cross_entropy_backward", &gptext::cross_entropy_backward_cpu);
  m.impl("layernorm", &gptext::layernorm_cpu);
  m.impl("layernorm_residual", &gptext::layernorm_residual_cpu);
  m.impl("rmsnorm", &gptext::rmsnorm_cpu);
  m.impl("rmsnorm_residual", &gptext::rmsnorm_residual_cpu);
  m.impl("linear", &gptext::linear_cpu);
  m.impl("ffn", &gptext::ffn_cpu);
  m.impl("rope", &gptext::rope_cpu);
  m.impl("expert_linear", &gptext::expert_linear_cpu);
  m.impl("attention", &gptext::attention_cpu);
  m.impl("attention_backward", &gptext::attention_backward_cpu);
  m.impl("_linear_backend", &gptext::linear_backend_cpu);
}
