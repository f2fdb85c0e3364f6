// Run-time choice between the baseline, AVX2 and AVX-512 builds of the CPU kernels.
#include <algorithm>
#include <cstdlib>
#include <string>

#include <unistd.h>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#endif

#include "cpu_kernels.h"

namespace gptext::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

Isa supported_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  // F16C (fp16 <-> fp32 conversions) came with or before AVX2 on every x86 core that has it.
  static const Isa isa = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
      return Isa::Baseline;
    }
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::Avx512 : Isa::Avx2;
  }();
  return isa;
#else
  return Isa::Baseline;
#endif
}

Isa active_isa() {
  static const Isa isa = [] {
    const Isa supported = supported_isa();
    const char* env = std::getenv("GPTEXT_CPU_ISA");
    if (env == nullptr) return supported;
    const std::string wanted = env;
    for (Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512}) {
      if (wanted == isa_name(isa)) return std::min(isa, supported);
    }
    return supported;  // an unknown name is reported by gptext.build_info(), which shows the ISA in use
  }();
  return isa;
}

// Whether the processor has the named AVX-512 extension and the AVX-512 build is in use
// (so that GPTEXT_CPU_ISA=avx2 runs what a processor without AVX-512 would). A macro, as
// __builtin_cpu_supports takes only a string literal.
#if defined(__x86_64__) || defined(_M_X64)
#define GPTEXT_AVX512_WITH(feature) (active_isa() == Isa::Avx512 && __builtin_cpu_supports(feature))
#else
#define GPTEXT_AVX512_WITH(feature) false
#endif

bool bf16_dot_product() {
  static const bool supported = GPTEXT_AVX512_WITH("avx512bf16");
  return supported;
}

bool fp16_arithmetic() {
  static const bool supported = GPTEXT_AVX512_WITH("avx512fp16");
  return supported;
}

bool amx_bf16() {
  static const bool usable = [] {
#if defined(__x86_64__) && defined(__linux__)
    if (active_isa() != Isa::Avx512) return false;
    if (const char* env = std::getenv("GPTEXT_CPU_AMX"); env != nullptr && std::string(env) == "0") return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
    if (!amx_bf16 || !amx_tile) return false;
    // Linux hands out the 8 KB tile state only to processes that ask for it.
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

// The most last-level cache one processor of this system is taken to have to itself. A
// virtual machine's few processors see the whole socket's L3 (300 MB on the Intel Xeon
// host, for 2 processors); its share is far less. Above the biggest per-core L3 on sale
// (12 MB, AMD's stacked-cache parts), and no less than an AMD EPYC host with 2 processors
// measured as its own (its whole 32 MB L3; see cpu_kernels.h).
constexpr int64_t kMaxCachePerCpu = int64_t(16) << 20;

int64_t env_integer(const char* name, int64_t minimum, int64_t fallback) {
  if (const char* env = std::getenv(name)) {
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && value >= minimum) return int64_t(value);
  }
  return fallback;
}

int64_t stream_min_traffic() {
  static const int64_t bytes = [] {
    if (const int64_t value = env_integer("GPTEXT_CPU_STREAM_BYTES", 1, 0); value > 0) return value;
    int64_t cache = int64_t(32) << 20;
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE); l3 > 0) cache = int64_t(l3);
#endif
    const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus > 0) cache = std::min(cache, int64_t(cpus) * kMaxCachePerCpu);
    return cache;
  }();
  return bytes;
}

#if defined(__x86_64__) || defined(_M_X64)
#define GPTEXT_CPU_CALL(fn, ...)                                                    \
  (active_isa() == Isa::Avx512 ? avx512::fn(__VA_ARGS__)                           \
   : active_isa() == Isa::Avx2 ? avx2::fn(__VA_ARGS__)                             \
                               : baseline::fn(__VA_ARGS__))
#else
#define GPTEXT_CPU_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif

void softmax_rows(DType dtype, const SoftmaxArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(softmax_rows, dtype, args, row_begin, row_end);
}

void cross_entropy_rows(DType dtype, const CrossEntropyArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(cross_entropy_rows, dtype, args, row_begin, row_end);
}

void cross_entropy_backward_rows(DType dtype, const CrossEntropyArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(cross_entropy_backward_rows, dtype, args, row_begin, row_end);
}

void layernorm_rows(DType dtype, const NormArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(layernorm_rows, dtype, args, row_begin, row_end);
}

void rope_rows(DType dtype, const RopeArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(rope_rows, dtype, args, row_begin, row_end);
}

void epilogue_rows(DType dtype, const GemmArgs& args, int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(epilogue_rows, dtype, args, row_begin, row_end);
}

void epilogue_block(DType dtype, const GemmArgs& args, const float* sums, int64_t ld, int64_t n0, int64_t width,
                    int64_t row_begin, int64_t row_end) {
  GPTEXT_CPU_CALL(epilogue_block, dtype, args, sums, ld, n0, width, row_begin, row_end);
}

void skinny_gemm(DType dtype, const GemmArgs& args, int64_t n_begin, int64_t n_end) {
  GPTEXT_CPU_CALL(skinny_gemm, dtype, args, n_begin, n_end);
}

void amx_pack_rows(const GemmArgs& args, uint32_t* packed, int64_t block_begin, int64_t block_end) {
  GPTEXT_CPU_CALL(amx_pack_rows, args, packed, block_begin, block_end);
}

void gemm_amx(const GemmArgs& args, const uint32_t* packed, int64_t n_begin, int64_t n_end) {
  GPTEXT_CPU_CALL(gemm_amx, args, packed, n_begin, n_end);
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

}  // namespace gptext::cpu
