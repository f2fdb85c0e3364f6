// Shared building blocks for gptext's kernels.
//
// Everything marked GPTEXT_HD compiles for both the host and the device: the CPU
// implementations in csrc/cpu/ call the very same functions as the CUDA kernels, so the
// math is exercised on every machine, GPU or not. GPTEXT_HD functions have internal
// linkage (`static`) on purpose: csrc/cpu/ compiles the same code twice, once with AVX2
// enabled, and internal linkage keeps the two copies from being merged by the linker.
//
// The device-only part (vector packs, warp and block reductions) sits under __CUDACC__.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GPTEXT_HD static __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too: the CPU kernels call these inside `omp simd` loops, which
// vectorise only if the call is inlined (a large caller can exhaust GCC's inlining budget).
#define GPTEXT_HD static inline __attribute__((always_inline))
#else
#define GPTEXT_HD static inline
#endif

namespace gptext {

// The element types every kernel accepts; values match gptext_kernels.h's callers.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

GPTEXT_HD int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

GPTEXT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= n (n >= 1), used to pick a register-tile template.
GPTEXT_HD int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// ---- Scalar conversions for 16-bit storage, bit-exact on host and device ----------------
// The host has no native bf16/fp16 type, so the CPU kernels keep raw bits (uint16_t) and
// convert with these. Rounding is to nearest-even, NaN stays NaN: the same as the CUDA
// intrinsics and as torch.

// Bit casts. __builtin_bit_cast (not memcpy) keeps the host loops that use them
// vectorisable.
GPTEXT_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

GPTEXT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

GPTEXT_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

GPTEXT_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return uint16_t((u + rounding_bias) >> 16);
}

// The fp16 conversions compute every case and select, without branches, so that the CPU
// loops using them vectorise.
GPTEXT_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  const float normal = bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  const float special = bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  // Subnormal (or zero): the value is mant * 2^-24, exact in fp32.
  const float magnitude = float(mant) * 5.9604644775390625e-08f;
  const float tiny = sign ? -magnitude : magnitude;
  return exp == 0x1fu ? special : (exp != 0 ? normal : tiny);
}

GPTEXT_HD uint16_t float_to_f16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs_bits = u & 0x7fffffffu;
  // Normal results: round the mantissa to nearest-even, rebias the exponent.
  const uint32_t r = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  const uint32_t normal = (((r >> 23) - 112u) << 10) | ((r >> 13) & 0x3ffu);
  // Subnormal results: scale so the integer part is the mantissa and let the fp32 adder
  // round to nearest-even.
  const float scaled = bits_to_float(abs_bits < 0x38800000u ? abs_bits : 0u) * 16777216.0f;  // * 2^24
  const uint32_t subnormal = uint32_t(scaled + 8388608.0f - 8388608.0f);
  const uint32_t magnitude = abs_bits > 0x7f800000u    ? 0x7e00u  // NaN
                             : abs_bits >= 0x477ff000u ? 0x7c00u  // rounds to +-inf
                             : abs_bits < 0x38800000u  ? subnormal
                                                       : normal;
  return uint16_t(sign | magnitude);
}

// ---- Transcendentals shared by softmax, GELU and the CPU kernels --------------------------

constexpr float kLog2e = 1.4426950408889634f;

// 2^x. The device uses the SFU instruction ex2.approx (relative error ~2^-22) in its .ftz
// form: results below 2^-126 flush to 0, as the host version's do. (Without .ftz, ptxas
// wraps every exponential in a range test and two conditional scalings, six more
// instructions around one MUFU.EX2, in the attention kernels' inner loops.) The host
// splits x into n = round(x) and f = x - n in [-0.5, 0.5] and evaluates 2^f with a
// degree-6 minimax polynomial (relative error 1.9e-9, ~8e-8 once evaluated in fp32),
// written so that compilers vectorise it: std::exp2 is a library call that blocks
// vectorisation. About 15 vector instructions an element: it is most of the CPU softmax's
// and attention's arithmetic. (The CPU files build with -fno-trapping-math, without which
// GCC will not if-convert the selects.)
GPTEXT_HD float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  // Clamp to [-127, 127]; NaN passes both tests unchanged and stays NaN through f and p.
  const float xc = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
  // Adding 1.5 * 2^23 rounds to an integer (the sum's unit is 1): shifted's low mantissa
  // bits hold round(xc) above the constant's bits, 0x4b400000.
  const float shifted = xc + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float f = xc - n;
  float p = 1.5345812e-4f;
  p = p * f + 1.3399931e-3f;
  p = p * f + 9.6184890e-3f;
  p = p * f + 5.5503288e-2f;
  p = p * f + 0.24022647f;
  p = p * f + 0.69314721f;
  p = p * f + 1.0f;
  // 2^n as the float with exponent field n + 127: (bits(shifted) + 127) << 23, in which the
  // shift drops the constant's bits. n = -127 (x <= -127, -inf included) gives the bits of
  // +0, so underflow comes out as 0 with no test. Integer arithmetic on the bits stays
  // defined for NaN, where converting n to an int would not.
  return p * bits_to_float((float_to_bits(shifted) + 127u) << 23);
#endif
}

}  // namespace gptext

// ---- Device-only helpers -----------------------------------------------------------------
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <type_traits>

namespace gptext::dev {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Rounds through the storage type: what a value becomes once written to memory as T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// N elements moved as one aligned access (N * sizeof(T) == 16 gives a 128-bit load).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Two floats rounded to the 16-bit type and packed, the first in the low half (the element
// with the lower column index in a fragment register).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

// The store is built from 32-bit words and issued as one 8- or 16-byte PTX store. Assigning
// a Pack, or even a uint4 made of the words, let the compiler split it into 16- or 32-bit
// stores in some kernels (seen in the PTX of the online softmax), and an H100 then moves
// several times the data's L2 sectors.
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  constexpr int kBytes = int(sizeof(T)) * N;
  if constexpr (kBytes < 4) {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
  } else {
    constexpr int kWords = kBytes / 4;
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      if constexpr (sizeof(T) == 4) {
        w[i] = __float_as_uint(in[i]);
      } else {
        w[i] = pack2<T>(in[2 * i], in[2 * i + 1]);
      }
    }
    static_assert(kWords == 1 || kWords == 2 || kWords == 4, "a pack is 4, 8 or 16 bytes");
    if constexpr (kWords == 4) {
      asm volatile("st.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                   : "memory");
    } else if constexpr (kWords == 2) {
      asm volatile("st.v2.b32 [%0], {%1, %2};\n" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
    } else {
      *reinterpret_cast<uint32_t*>(p) = w[0];
    }
  }
}

__host__ __device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// max(a, b) that keeps a NaN, as PyTorch's max does (fmaxf drops it): a row max over
// values that hold a NaN is NaN, so that every probability and the log-sum-exp derived from
// it come out NaN instead of the NaN being skipped.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reduction of one float per thread with an associative `combine`; every
// thread gets the result. `scratch` holds 32 floats of shared memory; blockDim.x must be a
// multiple of 32. The trailing barrier lets the caller reuse `scratch` straight away.
template <typename Combine>
__device__ __forceinline__ float block_reduce(float v, float* scratch, Combine combine, float identity) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : identity;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  return v;
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, SumOp{}, 0.0f); }
__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_reduce(v, scratch, MaxOp{}, -INFINITY);
}

// Reduction over the threads that share a row: a warp (kWarpPerRow) or the whole block.
template <bool kWarpPerRow>
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  if constexpr (kWarpPerRow) return warp_sum(v);
  else return block_sum(v, scratch);
}
template <bool kWarpPerRow>
__device__ __forceinline__ float row_max(float v, float* scratch) {
  if constexpr (kWarpPerRow) return warp_max(v);
  else return block_max(v, scratch);
}

// Grid size for kernels that loop over rows: enough blocks to fill any current GPU many
// times over; rows beyond that are looped over inside a block.
__host__ __forceinline__ unsigned capped_grid(int64_t blocks) {
  constexpr int64_t kMaxGridBlocks = int64_t(1) << 20;
  return unsigned(blocks < kMaxGridBlocks ? blocks : kMaxGridBlocks);
}

// Opts `Kernel` in to `bytes` of dynamic shared memory (needed above 48 KiB) on the current
// device, once per device.
template <auto Kernel>
__host__ cudaError_t allow_dynamic_smem(size_t bytes) {
  static std::atomic<uint64_t> done_devices{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = uint64_t(1) << (device % 64);
  if ((done_devices.load() & bit) == 0) {
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
    done_devices.fetch_or(bit);
  }
  return cudaSuccess;
}

// Calls fn(std::integral_constant<int, P>{}) for the smallest power of two P in
// [FIRST, LAST] with P >= needed (LAST when none is): picks a register-tile template.
template <int FIRST, int LAST, typename Fn>
__host__ __forceinline__ auto dispatch_pow2(int64_t needed, Fn&& fn) {
  if constexpr (FIRST >= LAST) {
    return fn(std::integral_constant<int, LAST>{});
  } else {
    if (needed <= FIRST) return fn(std::integral_constant<int, FIRST>{});
    return dispatch_pow2<FIRST * 2, LAST>(needed, fn);
  }
}

// Launches a "row in registers" kernel (softmax.cu, layernorm.cu) over rows of `cols`
// elements of T moved VEC at a time (cols <= kBlockMaxCols): up to kWarpMaxCols a warp per
// row, four rows per block, the per-thread register tile (ITERS packs) the smallest power
// of two that covers the row; beyond, a block per row with 64 bytes of the row per thread
// (row_kernel_iters), so that a thread of a 16-bit row has as many loads in flight as one
// of an fp32 row. (With 16 elements a thread, on an H100 on 2026-11-23, bf16/fp16
// layernorm rows of 1600 and 2880 reached 67-87% of copy bandwidth and fp32 rows 92-97%;
// 64 bytes for 16-bit types is unverified.) launch(iters, warp_per_row, grid, threads)
// gets ITERS and warp_per_row as std::integral_constant / std::bool_constant.
constexpr int kRowKernelRowsPerBlock = 4;  // rows per block, warp-per-row variant

// Packs per thread of the block-per-row variant: 64 bytes, or 16 single elements where the
// row can't move in 16-byte packs (VEC = 1).
template <typename T, int VEC>
__host__ __device__ constexpr int row_kernel_iters() {
  return VEC == 1 ? 16 : 64 / int(VEC * sizeof(T));
}

// The __launch_bounds__ of a kernel that launch_row_kernel launches: the threads of its
// longest row (kBlockMaxCols elements, VEC * ITERS a thread), so that the compiler may give
// each thread as many registers as that block allows, and no fewer.
__host__ __device__ constexpr int row_kernel_threads(bool warp_per_row, int64_t block_max_cols, int elems_per_thread) {
  return warp_per_row ? 32 * kRowKernelRowsPerBlock
                      : int((block_max_cols + 32 * elems_per_thread - 1) / (32 * elems_per_thread) * 32);
}

template <typename T, int VEC, int64_t kWarpMaxCols, int64_t kBlockMaxCols, typename Launch>
__host__ cudaError_t launch_row_kernel(int64_t rows, int64_t cols, Launch&& launch) {
  if (cols > kBlockMaxCols) return cudaErrorInvalidValue;
  const int64_t packs = ceil_div(cols, VEC);
  if (cols <= kWarpMaxCols) {
    const dim3 grid(capped_grid(ceil_div(rows, kRowKernelRowsPerBlock)));
    return dispatch_pow2<1, int(kWarpMaxCols / 32 / VEC)>(ceil_div(packs, 32), [&](auto iters) {
      launch(iters, std::true_type{}, grid, 32 * kRowKernelRowsPerBlock);
      return cudaGetLastError();
    });
  }
  constexpr int kIters = row_kernel_iters<T, VEC>();
  static_assert(row_kernel_threads(false, kBlockMaxCols, VEC * kIters) <= 1024, "a block holds the longest row");
  launch(std::integral_constant<int, kIters>{}, std::false_type{}, dim3(capped_grid(rows)),
         int(ceil_div(ceil_div(packs, kIters), 32) * 32));
  return cudaGetLastError();
}

}  // namespace gptext::dev

// Maps a DType to the CUDA storage type and calls `body` with a value of that type (the
// value itself is unused: only its type matters).
#define GPTEXT_DISPATCH_DTYPE(dtype, T, ...)                \
  [&] {                                                     \
    switch (dtype) {                                        \
      case ::gptext::DType::F32: {                          \
        using T = float;                                    \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::gptext::DType::F16: {                          \
        using T = __half;                                   \
        return __VA_ARGS__();                               \
      }                                                     \
      default: {                                            \
        using T = __nv_bfloat16;                            \
        return __VA_ARGS__();                               \
      }                                                     \
    }                                                       \
  }()

#endif  // __CUDACC__
