// The CPU kernels compiled for AVX2 + FMA (8-wide fp32) and F16C (fp16 rows converted 8
// values an instruction), chosen at run time when the processor has them. System headers
// come first so that only gptext's own (internal linkage) code is compiled for the wider
// target.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
#define GPTEXT_CPU_ISA avx2
#define GPTEXT_CPU_AVX2 1
#include "cpu_impl.h"
#endif
