// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) as well as AVX2 + FMA + F16C, chosen
// at run time when the processor has them: 16 fp32 lanes a vector, in the explicit
// conversions (Vec in cpu_impl.h) and in the loops GCC vectorises (prefer-vector-width=512;
// GCC's default for this target would keep them 256 bits wide). System headers come first
// so that only gptext's own (internal linkage) code is compiled for the wider target.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
// GCC 12 warns that the "undefined" source operand inside its own AVX-512 intrinsics is
// (or may be) used uninitialised (a false positive: those lanes are masked off or overwritten).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define GPTEXT_CPU_ISA avx512
#define GPTEXT_CPU_AVX2 1
#define GPTEXT_CPU_AVX512 1
#include "cpu_impl.h"
#endif
