// Run-time choice between the baseline and AVX2 builds of the CPU kernels.
#include "cpu_kernels.h"

namespace gptext::cpu {
namespace {

bool use_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  // F16C (fp16 <-> fp32 conversions) came with or before AVX2 on every x86 core that has it.
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

}  // namespace

#if defined(__x86_64__) || defined(_M_X64)
#define GPTEXT_CPU_CALL(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define GPTEXT_CPU_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif

void softmax_rows(DType dtype, const SoftmaxArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(softmax_rows, dtype, args, row_begin, row_end);
}

void layernorm_rows(DType dtype, const NormArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(layernorm_rows, dtype, args, row_begin, row_end);
}

void epilogue_rows(DType dtype, const GemmArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(epilogue_rows, dtype, args, row_begin, row_end);
}

void skinny_gemm(DType dtype, const GemmArgs& args, int64_t n_begin, int64_t n_end) {
  GPTEXT_CPU_CALL(skinny_gemm, dtype, args, n_begin, n_end);
}

void attention_forward(DType dtype, const AttentionArgs& args, int64_t task_begin, int64_t task_end) {
  GPTEXT_CPU_CALL(attention_forward, dtype, args, task_begin, task_end);
}

void attention_backward(DType dtype, const AttentionGradArgs& args, int64_t task_begin, int64_t task_end) {
  GPTEXT_CPU_CALL(attention_backward, dtype, args, task_begin, task_end);
}

void to_storage(DType dtype, const float* src, void* dst, int64_t n) { GPTEXT_CPU_CALL(to_storage, dtype, src, dst, n); }

void from_storage(DType dtype, const void* src, float* dst, int64_t n) {
  GPTEXT_CPU_CALL(from_storage, dtype, src, dst, n);
}

const char* instruction_set() { return use_avx2() ? "avx2" : "baseline"; }

}  // namespace gptext::cpu
