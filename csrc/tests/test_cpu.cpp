// Host tests of the CPU kernels' storage conversions: the baseline, AVX2 and AVX-512 builds
// (the wider ones where this processor has them) must round fp32 to bf16 / fp16, and widen back,
// exactly as the scalar conversions the GPU kernels use (csrc/kernels/common.cuh), for
// every bit pattern that matters: ties, overflow to infinity, subnormals, NaN payloads.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cpu/cpu_kernels.h"
#include "../kernels/common.cuh"
#include "check.h"

using namespace gptext;

using ToStorage = void (*)(DType, const float*, void*, int64_t);
using FromStorage = void (*)(DType, const void*, float*, int64_t);

struct Build {
  const char* name;
  ToStorage to;
  FromStorage from;
};

static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// fp32 inputs: every upper half with low halves at and around the rounding ties, plus random
// patterns. An odd count, so that the vector loops' scalar tails run too.
static std::vector<float> conversion_inputs() {
  std::vector<float> values;
  for (uint32_t high = 0; high < 0x10000; ++high) {
    for (uint32_t low : {0x0000u, 0x0001u, 0x0fffu, 0x1000u, 0x1001u, 0x2000u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      values.push_back(from_bits(high << 16 | low));
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 100001; ++i) values.push_back(from_bits(uint32_t(rng())));
  return values;
}

static void test_to_storage(const Build& build, const std::vector<float>& values) {
  const int64_t n = int64_t(values.size());
  std::vector<uint16_t> bf16(values.size()), f16(values.size());
  build.to(DType::BF16, values.data(), bf16.data(), n);
  build.to(DType::F16, values.data(), f16.data(), n);
  int bad_bf16 = 0, bad_f16 = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const float v = values[i];
    if (bf16[i] != float_to_bf16_bits(v) && bad_bf16++ < 5) {
      CHECK(false, "%s bf16 of 0x%08x: 0x%04x, expected 0x%04x", build.name, bits_of(v), bf16[i],
            float_to_bf16_bits(v));
    }
    // fp16 NaN payloads may differ between F16C and the software conversion: both must be
    // a quiet NaN of the same sign.
    const uint16_t expected = float_to_f16_bits(v);
    const bool ok = std::isnan(v) ? ((f16[i] & 0x7e00u) == 0x7e00u && (f16[i] & 0x8000u) == (expected & 0x8000u))
                                  : f16[i] == expected;
    if (!ok && bad_f16++ < 5) {
      CHECK(false, "%s fp16 of 0x%08x: 0x%04x, expected 0x%04x", build.name, bits_of(v), f16[i], expected);
    }
  }
  CHECK(bad_bf16 == 0, "%s: %d bf16 conversions differ", build.name, bad_bf16);
  CHECK(bad_f16 == 0, "%s: %d fp16 conversions differ", build.name, bad_f16);
}

static void test_from_storage(const Build& build) {
  std::vector<uint16_t> all(0x10001);  // every pattern, and one more for the tail
  for (size_t i = 0; i < all.size(); ++i) all[i] = uint16_t(i);
  std::vector<float> widened(all.size());
  for (DType dtype : {DType::BF16, DType::F16}) {
    build.from(dtype, all.data(), widened.data(), int64_t(all.size()));
    int bad = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      const float expected = dtype == DType::BF16 ? bf16_bits_to_float(all[i]) : f16_bits_to_float(all[i]);
      const bool ok = std::isnan(expected) ? std::isnan(widened[i]) : bits_of(widened[i]) == bits_of(expected);
      if (!ok) ++bad;
    }
    CHECK(bad == 0, "%s: %d %s values widen wrongly", build.name, bad, dtype == DType::BF16 ? "bf16" : "fp16");
  }
}

int main() {
  const std::vector<float> values = conversion_inputs();
  std::vector<Build> builds = {{"baseline", cpu::baseline::to_storage, cpu::baseline::from_storage}};
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu::supported_isa() >= cpu::Isa::Avx2) builds.push_back({"avx2", cpu::avx2::to_storage, cpu::avx2::from_storage});
  if (cpu::supported_isa() >= cpu::Isa::Avx512) {
    builds.push_back({"avx512", cpu::avx512::to_storage, cpu::avx512::from_storage});
  }
  if (builds.size() < 3) std::printf("cpu conversions: the %s build is the widest this processor runs\n",
                                     cpu::isa_name(cpu::supported_isa()));
#endif
  for (const Build& build : builds) {
    test_to_storage(build, values);
    test_from_storage(build);
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("cpu conversions: all checks passed (%zu builds)\n", builds.size());
  return 0;
}
