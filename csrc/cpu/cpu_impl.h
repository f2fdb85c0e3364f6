// The CPU kernels' bodies, included by kernels_baseline.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp, each of which defines GPTEXT_CPU_ISA (the namespace) and the
// compiler's target before including it (GPTEXT_CPU_AVX2: x86 vector intrinsics, 8 fp32
// lanes; with GPTEXT_CPU_AVX512 too, 16). Everything here has internal linkage, so the
// compilations never share code.
//
// The loops are written for the auto-vectoriser: rows are staged in an fp32 buffer, the
// reductions carry `omp simd reduction` clauses (built with -fopenmp-simd: no OpenMP
// runtime) and the transcendental functions are the branch-free ones of common.cuh.
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../kernels/activations.cuh"
#include "../kernels/attention_math.cuh"
#include "../kernels/norm_math.cuh"
#include "../kernels/softmax_math.cuh"
#include "cpu_kernels.h"

namespace gptext::cpu::GPTEXT_CPU_ISA {
namespace {

// Storage formats. 16-bit values are kept as raw bits (uint16_t) and converted exactly as
// the GPU converts them; plain integer storage (not a wrapper struct) keeps the loops
// vectorisable. With AVX2 or AVX-512 every loop over stored values goes through Lanes
// (below), a vector of values an instruction group, instead of these scalar conversions
// (fp16's software one takes dozens of instructions per value; F16C does 8 or 16 in one).
// The conversions are always inlined, like the math helpers (GPTEXT_HD): a call left in an
// `omp simd` loop makes it scalar, and GCC stops inlining once a caller grows large enough.
#define GPTEXT_CPU_INLINE static inline __attribute__((always_inline))
struct F32 {
  using storage = float;
  GPTEXT_CPU_INLINE float load(float v) { return v; }
  GPTEXT_CPU_INLINE float store(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  GPTEXT_CPU_INLINE float load(uint16_t v) { return bf16_bits_to_float(v); }
  GPTEXT_CPU_INLINE uint16_t store(float v) { return float_to_bf16_bits(v); }
};
struct F16 {
  using storage = uint16_t;
  GPTEXT_CPU_INLINE float load(uint16_t v) { return f16_bits_to_float(v); }
  GPTEXT_CPU_INLINE uint16_t store(float v) { return float_to_f16_bits(v); }
};

#ifdef GPTEXT_CPU_AVX2
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// One register of fp32 lanes and the 16-bit values that fill it: 16 in the AVX-512 build
// (kernels_avx512.cpp), 8 in the AVX2 one. Everything below that works a vector at a time
// is written against Vec, so both builds share it.
#ifdef GPTEXT_CPU_AVX512
struct Vec {
  static constexpr int kWidth = 16;
  using f32 = __m512;
  using u16 = __m256i;  // 16 16-bit values
  static f32 load(const float* p) { return _mm512_loadu_ps(p); }
  static f32 load_aligned(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, f32 v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, f32 v) { _mm512_stream_ps(p, v); }
  static u16 load(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store(uint16_t* p, u16 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static void stream(uint16_t* p, u16 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v); }
  static f32 zero() { return _mm512_setzero_ps(); }
  static f32 splat(float v) { return _mm512_set1_ps(v); }
  static f32 add(f32 a, f32 b) { return _mm512_add_ps(a, b); }
  static f32 sub(f32 a, f32 b) { return _mm512_sub_ps(a, b); }
  static f32 mul(f32 a, f32 b) { return _mm512_mul_ps(a, b); }
  // 1 / d, for d >= 1: the 14-bit estimate and one Newton step, within about an ulp of the
  // quotient at a fraction of vdivps's cost. A result below the normal range stays exact
  // here (vrcp14ps honours denormals).
  static f32 reciprocal(f32 d) {
    const f32 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  }
  // v where x >= bound, else 0 (a NaN x too).
  static f32 where_at_least(f32 x, float bound, f32 v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(bound), _CMP_GE_OQ), v);
  }
  static f32 fmadd(f32 a, f32 b, f32 c) { return _mm512_fmadd_ps(a, b, c); }
  // v > acc ? v : acc per lane (vmaxps returns its second operand when either is NaN): a
  // NaN v leaves acc as it was, as max_of does.
  static f32 max(f32 v, f32 acc) { return _mm512_max_ps(v, acc); }
  static f32 min(f32 v, f32 acc) { return _mm512_min_ps(v, acc); }  // NaN: as max
  static float sum(f32 v) { return _mm512_reduce_add_ps(v); }
  // Lane j of the result is the sum of v[j]'s lanes: kWidth sums in 15 adds, by a
  // butterfly of unpacks and 128-bit lane shuffles (fold_each), where a horizontal sum per
  // vector would take 4 dependent steps each.
  static f32 sum_each(const f32 (&v)[kWidth]) { return fold_each<add>(v); }
  // Lane j of the result is the largest of v[j]'s lanes (v holds no NaN).
  static f32 max_each(const f32 (&v)[kWidth]) { return fold_each<max>(v); }
  template <f32 (*op)(f32, f32)>
  static f32 fold_each(const f32 (&v)[kWidth]) {
    f32 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a b a b] partial results of v[2i], v[2i + 1]
      pairs[i] = op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a b c d]
      const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
      quads[i] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)  // 128-bit lanes 0+1 and 2+3 of quads[2i], then of quads[2i + 1]
      halves[i] = op(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                     _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
    return op(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88), _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
  }
  static float max_lanes(f32 v) { return _mm512_reduce_max_ps(v); }  // v holds no NaN
  // 2^n for each lane of a value rounded by adding 1.5 * 2^23 (exp2_lanes): the float
  // whose exponent field is n + 127.
  static f32 pow2_of_rounded(f32 shifted) {
    const __m512i biased = _mm512_add_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  static f32 from_f16(u16 h) { return _mm512_cvtph_ps(h); }
  static u16 to_f16(f32 v) { return _mm512_cvtps_ph(v, kNearest); }
  static f32 from_bf16(u16 h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  // float_to_bf16_bits, 16 lanes at a time (not vcvtneps2bf16, which flushes subnormals).
  static u16 to_bf16(f32 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i high = _mm512_srli_epi32(u, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i bits = _mm512_mask_or_epi32(rounded, nan, high, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(bits);  // every lane is below 2^16: the narrowing is exact
  }
};
#else
struct Vec {
  static constexpr int kWidth = 8;
  using f32 = __m256;
  using u16 = __m128i;  // 8 16-bit values
  static f32 load(const float* p) { return _mm256_loadu_ps(p); }
  static f32 load_aligned(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, f32 v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, f32 v) { _mm256_stream_ps(p, v); }
  static u16 load(const uint16_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static void store(uint16_t* p, u16 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
  static void stream(uint16_t* p, u16 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), v); }
  static f32 zero() { return _mm256_setzero_ps(); }
  static f32 splat(float v) { return _mm256_set1_ps(v); }
  static f32 add(f32 a, f32 b) { return _mm256_add_ps(a, b); }
  static f32 sub(f32 a, f32 b) { return _mm256_sub_ps(a, b); }
  static f32 mul(f32 a, f32 b) { return _mm256_mul_ps(a, b); }
  // As the AVX-512 one, from the 12-bit estimate: about 2 ulp (tiny results flush to 0).
  static f32 reciprocal(f32 d) {
    const f32 r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  }
  static f32 where_at_least(f32 x, float bound, f32 v) {
    return _mm256_and_ps(v, _mm256_cmp_ps(x, _mm256_set1_ps(bound), _CMP_GE_OQ));
  }
  static f32 fmadd(f32 a, f32 b, f32 c) { return _mm256_fmadd_ps(a, b, c); }
  static f32 max(f32 v, f32 acc) { return _mm256_max_ps(v, acc); }  // as the AVX-512 one
  static f32 min(f32 v, f32 acc) { return _mm256_min_ps(v, acc); }
  static float max_lanes(f32 v) {  // v holds no NaN
    const __m128 quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
  }
  static float sum(f32 v) {
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  }
  // Lane j of the result is the sum of v[j]'s lanes (as the AVX-512 one: 7 adds).
  static f32 sum_each(const f32 (&v)[kWidth]) {
    f32 pairs[4], quads[2];
    for (int i = 0; i < 4; ++i)
      pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m256d a = _mm256_castps_pd(pairs[2 * i]), b = _mm256_castps_pd(pairs[2 * i + 1]);
      quads[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                         _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
  }
  static f32 pow2_of_rounded(f32 shifted) {  // as the AVX-512 one
    const __m256i biased = _mm256_add_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static f32 from_f16(u16 h) { return _mm256_cvtph_ps(h); }
  static u16 to_f16(f32 v) { return _mm256_cvtps_ph(v, kNearest); }
  static f32 from_bf16(u16 h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  // float_to_bf16_bits, eight lanes at a time.
  static u16 to_bf16(f32 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i high = _mm256_srli_epi32(u, 16);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(high, _mm256_set1_epi32(1)));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i bits = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
    // Every lane holds a value below 2^16, so the saturating pack is exact; it packs within
    // 128-bit halves, and the permute brings the two halves' results together.
    const __m256i halves = _mm256_packus_epi32(bits, bits);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(halves, 0x08));
  }
};
#endif
constexpr int kW = Vec::kWidth;

// exp2_approx (common.cuh) of a vector's lanes, step for step (min and max keep a NaN lane
// NaN, as its clamps do).
inline Vec::f32 exp2_lanes(Vec::f32 x) {
  const Vec::f32 xc = Vec::min(Vec::splat(127.0f), Vec::max(Vec::splat(-127.0f), x));
  const Vec::f32 shifted = Vec::add(xc, Vec::splat(12582912.0f));
  const Vec::f32 f = Vec::sub(xc, Vec::sub(shifted, Vec::splat(12582912.0f)));
  Vec::f32 p = Vec::splat(1.5345812e-4f);
  for (float c : {1.3399931e-3f, 9.6184890e-3f, 5.5503288e-2f, 0.24022647f, 0.69314721f, 1.0f}) {
    p = Vec::fmadd(p, f, Vec::splat(c));
  }
  return Vec::mul(p, Vec::pow2_of_rounded(shifted));
}

// apply_activation (activations.cuh) of a vector's lanes: GELU as gelu_tanh computes it on
// the host, x / (1 + 2^v), the division a refined reciprocal (Vec::reciprocal; within a
// few ulp of the scalar). Against the tanh form (1 - 2 / (e + 1), through vdivps), on the
// Xeon measured: 11 -> 6-9 ns a vector of 16 over a row in L1, and 512x768->3072 +b+gelu
// on the AMX GEMM (one thread) about 5.2 -> 4.8 ms.
template <Activation ACT>
inline Vec::f32 activation_lanes(Vec::f32 x) {
  if constexpr (ACT == Activation::Gelu) {
    const Vec::f32 v = Vec::mul(x, Vec::fmadd(Vec::mul(x, x), Vec::splat(kGeluV3), Vec::splat(kGeluV1)));
    const Vec::f32 sigmoid = Vec::reciprocal(Vec::add(Vec::splat(1.0f), exp2_lanes(v)));
    return Vec::mul(x, Vec::where_at_least(x, kGeluLow, sigmoid));
  } else if constexpr (ACT == Activation::Relu) {
    return Vec::max(x, Vec::zero());  // a NaN lane gives 0, as x > 0 ? x : 0 does
  } else {
    return x;
  }
}

// A vector of a storage format: `load` widens kW stored values to fp32, `pack` rounds kW
// fp32 values to the storage format (as Fmt::store does, to nearest-even, NaN kept quiet),
// `unpack` widens packed values back, `put` stores them, with a non-temporal (streaming)
// store when kStream. A streaming store writes the line without first reading it into the
// cache: for outputs larger than the cache that saves a third of the memory traffic of a
// read-modify-write kernel, and it needs dst aligned to the vector's size.
template <typename Fmt>
struct Lanes;

template <>
struct Lanes<F32> {
  using packed = Vec::f32;
  static packed load(const float* p) { return Vec::load(p); }
  static packed pack(Vec::f32 v) { return v; }
  static Vec::f32 unpack(packed v) { return v; }
  template <bool kStream>
  static void put(float* p, packed v) {
    if constexpr (kStream) {
      Vec::stream(p, v);
    } else {
      Vec::store(p, v);
    }
  }
};

struct Lanes16 {  // what the two 16-bit formats share
  using packed = Vec::u16;
  template <bool kStream>
  static void put(uint16_t* p, packed v) {
    if constexpr (kStream) {
      Vec::stream(p, v);
    } else {
      Vec::store(p, v);
    }
  }
};

template <>
struct Lanes<F16> : Lanes16 {
  static Vec::f32 unpack(packed h) { return Vec::from_f16(h); }
  static Vec::f32 load(const uint16_t* p) { return unpack(Vec::load(p)); }
  static packed pack(Vec::f32 v) { return Vec::to_f16(v); }
};

template <>
struct Lanes<BF16> : Lanes16 {
  static Vec::f32 unpack(packed h) { return Vec::from_bf16(h); }
  static Vec::f32 load(const uint16_t* p) { return unpack(Vec::load(p)); }
  static packed pack(Vec::f32 v) { return Vec::to_bf16(v); }
};

// How many leading values of dst to store one by one before it is aligned for streaming
// stores (0 when not streaming; all of them if dst can never be aligned).
template <bool kStream, typename T>
inline int64_t stream_head(const T* dst, int64_t n) {
  if constexpr (!kStream) {
    return 0;
  } else {
    constexpr uintptr_t kAlign = kW * sizeof(T);
    const uintptr_t offset = reinterpret_cast<uintptr_t>(dst) % kAlign;
    if (offset % sizeof(T) != 0) return n;
    return std::min<int64_t>(n, int64_t((kAlign - offset) % kAlign / sizeof(T)));
  }
}
#endif

// n values between storage and fp32 (a vector at a time where the build has vectors: for
// fp16 one F16C instruction, where the branch-free software conversion takes dozens).
template <typename Fmt>
inline void load_rows(const typename Fmt::storage* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  for (; i + kW <= n; i += kW) Vec::store(dst + i, Lanes<Fmt>::load(src + i));
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dst[j] = Fmt::load(src[j]);
}

// dst[i] = fn(i) for i < n, rounded to the storage format; kStream: with streaming stores
// where the build has them (see Lanes), and the caller issues stream_fence() before its
// results are used. With vectors, fn is evaluated kW indices at a time into one.
template <typename Fmt, bool kStream = false, typename Fn>
inline void store_rows_fn(typename Fmt::storage* dst, int64_t n, Fn&& fn) {
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  for (const int64_t head = stream_head<kStream>(dst, n); i < head; ++i) dst[i] = Fmt::store(fn(i));
  alignas(64) float values[kW];
  for (; i + kW <= n; i += kW) {
#pragma omp simd
    for (int j = 0; j < kW; ++j) values[j] = fn(i + j);
    Lanes<Fmt>::template put<kStream>(dst + i, Lanes<Fmt>::pack(Vec::load_aligned(values)));
  }
#endif
  for (; i < n; ++i) dst[i] = Fmt::store(fn(i));
}

template <typename Fmt, bool kStream = false>
inline void store_rows(const float* src, typename Fmt::storage* dst, int64_t n) {
  store_rows_fn<Fmt, kStream>(dst, n, [src](int64_t i) { return src[i]; });
}

// sum = x + r rounded to the storage format, and sum's values (as stored) in fp32 to buf.
template <typename Fmt, bool kStream = false>
inline void add_rows(const typename Fmt::storage* x, const typename Fmt::storage* r, typename Fmt::storage* sum,
                     float* buf, int64_t n) {
  using T = typename Fmt::storage;
  int64_t i = 0;
  auto one = [&](int64_t j) {
    const T v = Fmt::store(Fmt::load(x[j]) + Fmt::load(r[j]));
    sum[j] = v;
    buf[j] = Fmt::load(v);
  };
#ifdef GPTEXT_CPU_AVX2
  using L = Lanes<Fmt>;
  for (const int64_t head = stream_head<kStream>(sum, n); i < head; ++i) one(i);
  for (; i + kW <= n; i += kW) {
    const auto packed = L::pack(Vec::add(L::load(x + i), L::load(r + i)));
    L::template put<kStream>(sum + i, packed);
    Vec::store(buf + i, L::unpack(packed));
  }
#endif
  for (; i < n; ++i) one(i);
}

// Orders a thread's streaming stores before whatever it does next (its results being read
// by another thread once the parallel region ends).
inline void stream_fence() {
#ifdef GPTEXT_CPU_AVX2
  _mm_sfence();
#endif
}

template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(F32{});
    case DType::F16:
      return fn(F16{});
    default:
      return fn(BF16{});
  }
}

// Reduction of f(v[i]) over a row with LANES independent partial results: 32 (four AVX2
// registers, two AVX-512 ones) run at load throughput instead of waiting on one accumulator's add latency;
// short rows use 8, since combining the partials at the end costs a step per partial.
// `combine` must be associative and commutative.
template <int LANES, typename F, typename Combine>
inline float reduce_lanes(const float* v, int64_t n, float identity, F f, Combine combine) {
  float partial[LANES];
  for (float& p : partial) p = identity;
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
#pragma omp simd
    for (int j = 0; j < LANES; ++j) partial[j] = combine(partial[j], f(v[i + j]));
  }
  for (; i < n; ++i) partial[0] = combine(partial[0], f(v[i]));
  float total = identity;
  for (float p : partial) total = combine(total, p);
  return total;
}

template <typename F, typename Combine>
inline float reduce_row(const float* v, int64_t n, float identity, F f, Combine combine) {
  return n < 512 ? reduce_lanes<8>(v, n, identity, f, combine) : reduce_lanes<32>(v, n, identity, f, combine);
}

inline float add(float a, float b) { return a + b; }
inline float max_of(float a, float b) { return b > a ? b : a; }  // ignores NaN, as fmaxf does
inline float identity(float v) { return v; }

// load_rows, returning the largest value loaded (NaN ignored, as max_of does): the 16-bit
// softmax converts its row and finds the max in one pass over it, not two.
template <typename Fmt>
inline float load_rows_max(const typename Fmt::storage* src, float* dst, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  if (n >= kW) {
    Vec::f32 acc[2] = {Vec::splat(-INFINITY), Vec::splat(-INFINITY)};  // two chains hide max's latency
    for (; i + 2 * kW <= n; i += 2 * kW) {
      for (int j = 0; j < 2; ++j) {
        const Vec::f32 v = Lanes<Fmt>::load(src + i + j * kW);
        Vec::store(dst + i + j * kW, v);
        acc[j] = Vec::max(v, acc[j]);
      }
    }
    if (i + kW <= n) {
      const Vec::f32 v = Lanes<Fmt>::load(src + i);
      Vec::store(dst + i, v);
      acc[0] = Vec::max(v, acc[0]);
      i += kW;
    }
    m = Vec::max_lanes(Vec::max(acc[1], acc[0]));
  }
#endif
  for (; i < n; ++i) {
    dst[i] = Fmt::load(src[i]);
    m = max_of(m, dst[i]);
  }
  return m;
}

// The largest of v[0..n) (NaN ignored, as max_of does); with vectors, four max chains, so
// that the pass runs at load speed rather than at max's latency.
inline float max_row(const float* v, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  if (n >= kW) {
    const Vec::f32 lowest = Vec::splat(-INFINITY);
    Vec::f32 acc[4] = {lowest, lowest, lowest, lowest};
    for (; i + 4 * kW <= n; i += 4 * kW) {
      for (int j = 0; j < 4; ++j) acc[j] = Vec::max(Vec::load(v + i + j * kW), acc[j]);
    }
    for (; i + kW <= n; i += kW) acc[0] = Vec::max(Vec::load(v + i), acc[0]);
    m = Vec::max_lanes(Vec::max(Vec::max(acc[0], acc[1]), Vec::max(acc[2], acc[3])));
  }
#endif
  for (; i < n; ++i) m = max_of(m, v[i]);
  return m;
}

// dst[i] = 2^((src[i] - max) k) for i < n (0 where src is -inf, or everywhere when max is);
// returns their sum. dst may be src. With vectors, four at a time in explicit intrinsics:
// compiled from softmax_exp, the clamps and the -inf test became masked blends, and the
// loop ran one vector at a time.
inline float exp_row(const float* src, float* dst, int64_t n, float max, float k) {
  if (max == -INFINITY) {  // nothing visible (softmax_exp's test, made once for the row)
    std::fill(dst, dst + n, 0.0f);
    return 0.0f;
  }
  float sum = 0.0f;
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  const Vec::f32 vmax = Vec::splat(max), vk = Vec::splat(k);
  Vec::f32 acc[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
  for (; i + 4 * kW <= n; i += 4 * kW) {
    for (int j = 0; j < 4; ++j) {
      const Vec::f32 e = exp2_lanes(Vec::mul(Vec::sub(Vec::load(src + i + j * kW), vmax), vk));
      Vec::store(dst + i + j * kW, e);
      acc[j] = Vec::add(acc[j], e);
    }
  }
  for (; i + kW <= n; i += kW) {
    const Vec::f32 e = exp2_lanes(Vec::mul(Vec::sub(Vec::load(src + i), vmax), vk));
    Vec::store(dst + i, e);
    acc[0] = Vec::add(acc[0], e);
  }
  sum = Vec::sum(Vec::add(Vec::add(acc[0], acc[1]), Vec::add(acc[2], acc[3])));
#endif
#pragma omp simd reduction(+ : sum)  // the baseline build's whole row: lanes keep the sum's error down
  for (int64_t j = i; j < n; ++j) {
    const float e = exp2_approx((src[j] - max) * k);
    dst[j] = e;
    sum += e;
  }
  return sum;
}

// A row's max as max_row and load_rows_max find it skips NaN; a row of NaN and -inf alone
// then looks empty (max -inf), which would give zeros. This makes its max NaN instead, so
// that the row comes out NaN as any other row holding a NaN does (through exp_row's sum).
inline float keep_nan_max(float row_max, const float* v, int64_t n) {
  if (row_max != -INFINITY) return row_max;
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(v[i])) return NAN;
  return row_max;
}

template <typename Fmt, bool kStream>
void softmax_rows_t(const SoftmaxArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  std::unique_ptr<float[]> buffer(new float[size_t(a.cols)]);  // no zero fill: every use writes first
  float* buf = buffer.get();
  const float k = a.scale * kLog2e;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    const KeyRange keys = attention_key_range(a.causal ? row % a.q_len : 0, a.q_len, a.cols, a.causal, a.window);
    const int64_t n = keys.end - keys.begin;
    // The row in fp32: read in place, or converted into buf as its max is found.
    const float* values = buf;
    float row_max;
    if constexpr (std::is_same_v<Fmt, F32>) {
      values = x + keys.begin;
      row_max = max_row(values, n);
    } else {
      row_max = load_rows_max<Fmt>(x + keys.begin, buf, n);
    }
    row_max = keep_nan_max(row_max, values, n);
    // Summed as the exponentials are made: one pass over the row, not two.
    const float inv = softmax_inv_sum(exp_row(values, buf, n, row_max, k));
    std::fill(y, y + keys.begin, Fmt::store(0.0f));
    std::fill(y + keys.end, y + a.cols, Fmt::store(0.0f));
    store_rows_fn<Fmt, kStream>(y + keys.begin, n, [buf, inv](int64_t i) { return buf[i] * inv; });
  }
  if (kStream) stream_fence();
}

// Cross-entropy, a row at a time through an fp32 buffer of the row (a vocabulary's row is
// 200 KB: it stays in L2 between the passes). Forward: the max as the row is converted (or
// read in place in fp32), then the sum of the exponentials: one read of the logits.
// Backward: the probabilities from the saved log-sum-exp, minus 1 at the target, times the
// row's gradient, rounded once: one read and one write.
inline bool cross_entropy_target(const CrossEntropyArgs& a, int64_t target) {
  return target != a.ignore_index && target >= 0 && target < a.cols;
}

template <typename Fmt>
void cross_entropy_rows_t(const CrossEntropyArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  std::unique_ptr<float[]> buffer(new float[size_t(a.cols)]);
  float* buf = buffer.get();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    const float* values = buf;
    float row_max;
    if constexpr (std::is_same_v<Fmt, F32>) {
      values = x;
      row_max = max_row(values, a.cols);
    } else {
      row_max = load_rows_max<Fmt>(x, buf, a.cols);
    }
    row_max = keep_nan_max(row_max, values, a.cols);
    const float log_sum = std::log(exp_row(values, buf, a.cols, row_max, kLog2e));
    const int64_t target = a.targets[row];
    a.lse[row] = row_max == -INFINITY ? -INFINITY : row_max + log_sum;
    // (max - x[t]) + log(sum), not lse - x[t]: no cancellation where the logits are large.
    a.loss[row] = target == a.ignore_index ? 0.0f
                  : cross_entropy_target(a, target) ? (row_max - Fmt::load(x[target])) + log_sum
                                                    : NAN;
  }
}

template <typename Fmt, bool kStream>
void cross_entropy_backward_rows_t(const CrossEntropyArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  std::unique_ptr<float[]> buffer(new float[size_t(a.cols)]);
  float* buf = buffer.get();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.cols;
    T* dx = static_cast<T*>(a.dx) + row * a.cols;
    const int64_t target = a.targets[row];
    if (!cross_entropy_target(a, target)) {
      store_rows_fn<Fmt, kStream>(dx, a.cols, [](int64_t) { return 0.0f; });
      continue;
    }
    const float* values = buf;
    if constexpr (std::is_same_v<Fmt, F32>) {
      values = x;
    } else {
      load_rows<Fmt>(x, buf, a.cols);
    }
    exp_row(values, buf, a.cols, a.lse[row], kLog2e);  // the probabilities: exp(x - lse)
    buf[target] -= 1.0f;
    const float g = a.grad[row];
    store_rows_fn<Fmt, kStream>(dx, a.cols, [buf, g](int64_t i) { return buf[i] * g; });
  }
  if (kStream) stream_fence();
}

// Each row goes through fp32 buffers (in L1: a row is a few KB); the weight and bias are
// converted once per call. With a residual, the statistics see the sum as stored (rounded
// to the storage type), as on the GPU. Two-pass statistics over the fp32 row.
template <typename Fmt, bool kStream>
void layernorm_rows_t(const NormArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  const int64_t n = a.cols;
  // fp32 weight and bias are read in place; 16-bit ones are converted once per call.
  constexpr bool kStage = !std::is_same_v<Fmt, F32>;
  std::unique_ptr<float[]> buffers(new float[size_t((kStage ? 3 : 1) * n)]);
  float* buf = buffers.get();
  const float* weight = static_cast<const float*>(a.weight);
  const float* bias = static_cast<const float*>(a.bias);
  if constexpr (kStage) {
    float* staged = buf + n;
    load_rows<Fmt>(static_cast<const T*>(a.weight), staged, n);
    weight = staged;
    if (bias != nullptr) {
      load_rows<Fmt>(static_cast<const T*>(a.bias), staged + n, n);
      bias = staged + n;
    }
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    if (a.residual != nullptr) {
      add_rows<Fmt, kStream>(x, static_cast<const T*>(a.residual) + row * n, static_cast<T*>(a.sum) + row * n, buf, n);
    } else {
      load_rows<Fmt>(x, buf, n);
    }
    const float mean = a.rms ? 0.0f : reduce_row(buf, n, 0.0f, identity, add) / float(n);
    const float squares = reduce_row(buf, n, 0.0f, [mean](float v) { return (v - mean) * (v - mean); }, add);
    const float rstd = norm_rstd(squares / float(n), a.eps);
    T* out = static_cast<T*>(a.out) + row * n;
    if (bias != nullptr) {
      store_rows_fn<Fmt, kStream>(out, n, [=](int64_t i) { return layernorm_apply(buf[i], mean, rstd, weight[i], bias[i]); });
    } else {
      store_rows_fn<Fmt, kStream>(out, n, [=](int64_t i) { return layernorm_apply(buf[i], mean, rstd, weight[i], 0.0f); });
    }
    if (a.mean != nullptr) a.mean[row] = mean;
    if (a.rstd != nullptr) a.rstd[row] = rstd;
  }
  if (kStream) stream_fence();
}

// linear_epilogue over one row of width values: out[i] = act(src[i] + bias[i]) +
// residual[i], src in format Src (the fp32 sums of a GEMM, or out itself for the epilogue
// in place), out, bias and residual in Fmt; the bias and residual read only when they
// exist. A vector at a time where the build has vectors, then value by value; rounded once.
// RoPE a row at a time: both halves into fp32, rotated with the position's cos and sin,
// rounded once into the output's row.
template <typename Fmt>
void rope_rows_t(const RopeArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  const int64_t half = a.head_dim / 2;
  std::unique_ptr<float[]> buffer(new float[size_t(2 * half)]);
  float* lo = buffer.get();
  float* hi = lo + half;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t t = row % a.positions, h = row / a.positions % a.heads, b = row / (a.positions * a.heads);
    const T* x = static_cast<const T*>(a.x) + b * a.x_stride[0] + h * a.x_stride[1] + t * a.x_stride[2];
    T* out = static_cast<T*>(a.out) + row * a.head_dim;
    const float* c = a.cos + (b * a.positions + t) * half;
    const float* s = a.sin + (b * a.positions + t) * half;
    load_rows<Fmt>(x, lo, half);
    load_rows<Fmt>(x + half, hi, half);
    store_rows_fn<Fmt>(out, half, [&](int64_t i) { return lo[i] * c[i] - hi[i] * s[i]; });
    store_rows_fn<Fmt>(out + half, half, [&](int64_t i) { return hi[i] * c[i] + lo[i] * s[i]; });
  }
}

template <typename Src, typename Fmt, Activation ACT, bool kBias, bool kResidual>
inline void epilogue_row(const typename Src::storage* src, typename Fmt::storage* out, int64_t width,
                         const typename Fmt::storage* bias, const typename Fmt::storage* residual) {
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  for (; i + kW <= width; i += kW) {
    Vec::f32 v = Lanes<Src>::load(src + i);
    if constexpr (kBias) v = Vec::add(v, Lanes<Fmt>::load(bias + i));
    v = activation_lanes<ACT>(v);
    if constexpr (kResidual) v = Vec::add(v, Lanes<Fmt>::load(residual + i));
    Lanes<Fmt>::template put<false>(out + i, Lanes<Fmt>::pack(v));
  }
#endif
  for (; i < width; ++i) {
    out[i] = Fmt::store(linear_epilogue(Src::load(src[i]), kBias ? Fmt::load(bias[i]) : 0.0f, ACT,
                                        kResidual ? Fmt::load(residual[i]) : 0.0f));
  }
}

// The epilogue in place, after ATen's GEMM, row by row (epilogue_row). (An `omp simd` loop
// over linear_epilogue, which this replaces, fell to 0.77x eager PyTorch (F.linear then
// F.gelu) at bf16 2048x768->3072 +b+gelu once GELU was a division; the explicit vectors
// give 1.4-1.8x, against 1.35-1.45x for that loop over the tanh form, in alternating
// processes on the Xeon, 2 threads.) Whether the bias and residual exist is a template
// parameter, not a test in the loop: an `p != nullptr ? p[i] : 0` inside a vectorised loop
// becomes a masked load, which on some x86 cores costs a microcode assist per vector when
// the pointer is null.
template <typename Fmt, Activation ACT, bool kBias, bool kResidual>
void epilogue_rows_act(const GemmArgs& a, int64_t row_begin, int64_t row_end) {
  using T = typename Fmt::storage;
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t row = row_begin; row < row_end; ++row) {
    T* c = static_cast<T*>(a.c) + row * a.ldc;
    const T* residual = kResidual ? static_cast<const T*>(a.residual) + row * a.ldc : nullptr;
    epilogue_row<Fmt, Fmt, ACT, kBias, kResidual>(c, c, a.n, bias, residual);
  }
}

// Calls fn(std::integral_constant<Activation, act>{}) so the activation is a compile-time
// constant inside vectorised loops.
template <typename Fn>
void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::Gelu:
      return fn(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::Relu:
      return fn(std::integral_constant<Activation, Activation::Relu>{});
    default:
      return fn(std::integral_constant<Activation, Activation::None>{});
  }
}

// Calls fn(act, bias, residual) with a GEMM epilogue's parts as compile-time constants:
// act an integral_constant<Activation>, bias and residual bool_constants (whether a's
// bias and residual are given).
template <typename Fn>
void dispatch_epilogue(const GemmArgs& a, Fn&& fn) {
  dispatch_activation(a.act, [&](auto act) {
    if (a.bias != nullptr) {
      if (a.residual != nullptr) return fn(act, std::true_type{}, std::true_type{});
      return fn(act, std::true_type{}, std::false_type{});
    }
    if (a.residual != nullptr) return fn(act, std::false_type{}, std::true_type{});
    return fn(act, std::false_type{}, std::false_type{});
  });
}

template <typename Fmt>
void epilogue_rows_t(const GemmArgs& a, int64_t row_begin, int64_t row_end) {
  dispatch_epilogue(a, [&](auto act, auto bias, auto residual) {
    epilogue_rows_act<Fmt, decltype(act)::value, decltype(bias)::value, decltype(residual)::value>(a, row_begin,
                                                                                                    row_end);
  });
}

// The dot products and row updates below load through Lanes explicitly, in every format
// (the baseline build keeps `omp simd` loops). GCC cannot turn fp16's scalar conversion
// into F16C instructions; bf16's explicit loops were measured a little faster (skinny
// GEMM 1x768->2304: 2.0x against 1.8x over F.linear); and GCC vectorised fp32's `omp simd`
// reduction over four rows only where it inlined dot4_rows: a build that kept it out of
// line ran it scalar (1x768->2304 at 0.42x F.linear).

// The skinny products below read the weight once, four rows at a time, and are bound by
// the memory's bandwidth when it comes from DRAM (decode, with a model larger than the
// cache). The hardware prefetchers alone left them short of it: while a tile of four
// weight rows is multiplied, each step also prefetches the lines of the values it reads
// (`count` from i in each row) `ahead` values further on, that is, in the next tile's rows
// (ahead = 4 rows; 0 when the rows are already in cache, from an earlier tile of rows of
// x). On the Intel Xeon host, bf16 one
// row, in alternating processes: 768->2304 x 12 weights 127-245 us -> 97-140 us, 768->50257
// 2.9-5.4 ms -> 1.8-2.6 ms, the ffn 335-541 us -> 261-405 us (4 and 8 rows ahead alike);
// fp32 768->50257 about 5.2 ms -> 4.7 ms. The AMX skinny GEMM's tile loads (2-16 rows)
// gained nothing from the same prefetch and go without.
// The address is formed as an integer: the last tile's may lie past the weight.
template <int64_t kCount, typename T>
inline void prefetch_ahead(const T* const (&w)[4], int64_t i, int64_t ahead) {
  constexpr int64_t kLine = 64, kBytes = kCount * int64_t(sizeof(T));
  for (int r = 0; r < 4; ++r) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(w[r] + i) + uintptr_t(ahead) * sizeof(T);
    for (int64_t b = 0; b < kBytes; b += kLine) __builtin_prefetch(reinterpret_cast<const void*>(at + b), 0, 3);
  }
}

// x . y over n values.
template <typename Fmt>
inline float dot_row(const float* x, const typename Fmt::storage* y, int64_t n) {
  float s = 0.0f;
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  Vec::f32 acc = Vec::zero();
  for (; i + kW <= n; i += kW) acc = Vec::fmadd(Vec::load(x + i), Lanes<Fmt>::load(y + i), acc);
  s = Vec::sum(acc);
#endif
#pragma omp simd reduction(+ : s)
  for (int64_t j = i; j < n; ++j) s += x[j] * Fmt::load(y[j]);
  return s;
}

// x . y[r] for the four rows y[0..3] of length n: four independent accumulators, so the
// FMAs of one row do not wait on the previous row's (one accumulator chain per dot product
// is latency-bound: a 64-wide dot is eight dependent FMAs).
template <typename Fmt>
inline void dot4_rows(const float* x, const typename Fmt::storage* const (&y)[4], int64_t n, float* out,
                      int64_t ahead = 0) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  using L = Lanes<Fmt>;
  // Two accumulators per row (even and odd vectors): half the length of each FMA chain.
  Vec::f32 a0 = Vec::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    if (ahead != 0) prefetch_ahead<2 * kW>(y, i, ahead);
    const Vec::f32 xa = Vec::load(x + i), xb = Vec::load(x + i + kW);
    a0 = Vec::fmadd(xa, L::load(y[0] + i), a0);
    a1 = Vec::fmadd(xa, L::load(y[1] + i), a1);
    a2 = Vec::fmadd(xa, L::load(y[2] + i), a2);
    a3 = Vec::fmadd(xa, L::load(y[3] + i), a3);
    b0 = Vec::fmadd(xb, L::load(y[0] + i + kW), b0);
    b1 = Vec::fmadd(xb, L::load(y[1] + i + kW), b1);
    b2 = Vec::fmadd(xb, L::load(y[2] + i + kW), b2);
    b3 = Vec::fmadd(xb, L::load(y[3] + i + kW), b3);
  }
  for (; i + kW <= n; i += kW) {
    const Vec::f32 xa = Vec::load(x + i);
    a0 = Vec::fmadd(xa, L::load(y[0] + i), a0);
    a1 = Vec::fmadd(xa, L::load(y[1] + i), a1);
    a2 = Vec::fmadd(xa, L::load(y[2] + i), a2);
    a3 = Vec::fmadd(xa, L::load(y[3] + i), a3);
  }
  s0 = Vec::sum(Vec::add(a0, b0));
  s1 = Vec::sum(Vec::add(a1, b1));
  s2 = Vec::sum(Vec::add(a2, b2));
  s3 = Vec::sum(Vec::add(a3, b3));
#endif
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = i; j < n; ++j) {
    s0 += x[j] * Fmt::load(y[0][j]);
    s1 += x[j] * Fmt::load(y[1][j]);
    s2 += x[j] * Fmt::load(y[2][j]);
    s3 += x[j] * Fmt::load(y[3][j]);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// acc[i] += sum over r < R of p[r] * v[r][i], for i < n: R value rows per sweep of the
// accumulator (a sweep per row would load and store it R times).
template <typename Fmt, int R>
inline void axpy_rows(float* acc, const float (&p)[R], const typename Fmt::storage* const (&v)[R], int64_t n) {
  int64_t i = 0;
#ifdef GPTEXT_CPU_AVX2
  Vec::f32 weights[R];
  for (int r = 0; r < R; ++r) weights[r] = Vec::splat(p[r]);
  for (; i + kW <= n; i += kW) {
    // A tree of products, not a chain of FMAs through the accumulator: shorter latency.
    Vec::f32 sum = Vec::mul(weights[0], Lanes<Fmt>::load(v[0] + i));
    for (int r = 1; r < R; ++r) sum = Vec::fmadd(weights[r], Lanes<Fmt>::load(v[r] + i), sum);
    Vec::store(acc + i, Vec::add(Vec::load(acc + i), sum));
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) {
    float a = p[0] * Fmt::load(v[0][j]);
    for (int r = 1; r < R; ++r) a += p[r] * Fmt::load(v[r][j]);
    acc[j] += a;
  }
}

#ifdef GPTEXT_CPU_AVX2
// Rows of a tile of the skinny product: MR rows of x against four weight rows in 4 * MR
// accumulators (16 in the AVX-512 build, 8 in the AVX2 one: half its registers).
constexpr int kSkinnyTileRows = kW / 4;

// out[mr * ldo + r] = x[mr] . w[r] for mr < MR, r < 4 (x rows ldx apart, fp32): each
// vector of k loads four weight vectors and MR x vectors for 4 * MR FMAs, and the 4 * MR
// sums come out of one Vec::sum_each, not a horizontal sum each.
template <typename Fmt, int MR>
inline void dot_tile(const float* x, int64_t ldx, const typename Fmt::storage* const (&w)[4], int64_t k, float* out,
                     int64_t ldo, int64_t ahead) {
  static_assert(4 * MR <= kW, "a tile's sums fill at most one vector");
  Vec::f32 acc[kW];
  for (Vec::f32& v : acc) v = Vec::zero();
  int64_t i = 0;
  for (; i + kW <= k; i += kW) {
    if (ahead != 0) prefetch_ahead<kW>(w, i, ahead);
    Vec::f32 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = Lanes<Fmt>::load(w[r] + i);
    for (int mr = 0; mr < MR; ++mr) {
      const Vec::f32 xv = Vec::load(x + mr * ldx + i);
      for (int r = 0; r < 4; ++r) acc[mr * 4 + r] = Vec::fmadd(xv, wv[r], acc[mr * 4 + r]);
    }
  }
  alignas(64) float sums[kW];
  Vec::store(sums, Vec::sum_each(acc));
  for (; i < k; ++i) {
    for (int mr = 0; mr < MR; ++mr)
      for (int r = 0; r < 4; ++r) sums[mr * 4 + r] += x[mr * ldx + i] * Fmt::load(w[r][i]);
  }
  for (int mr = 0; mr < MR; ++mr)
    for (int r = 0; r < 4; ++r) out[mr * ldo + r] = sums[mr * 4 + r];
}
#endif

// The skinny GEMM's epilogue for output columns [n0, n0 + width) of rows [m_begin, m_end)
// (every row by default): the fp32 sums (row m at sums + (m - m_begin) * ld) through bias,
// activation and residual into c (epilogue_row: in explicit vectors, since through
// store_rows_fn the AMX GEMM's epilogue took about as long as its tile products; GCC left
// the per-value function scalar).
template <typename Fmt, Activation ACT, bool kBias, bool kResidual>
inline void skinny_epilogue(const GemmArgs& a, const float* sums, int64_t ld, int64_t n0, int64_t width,
                            int64_t m_begin = 0, int64_t m_end = -1) {
  using T = typename Fmt::storage;
  const T* bias = kBias ? static_cast<const T*>(a.bias) + n0 : nullptr;
  for (int64_t m = m_begin; m < (m_end < 0 ? a.m : m_end); ++m) {
    const T* residual_row = kResidual ? static_cast<const T*>(a.residual) + m * a.ldc + n0 : nullptr;
    epilogue_row<F32, Fmt, ACT, kBias, kResidual>(sums + (m - m_begin) * ld, static_cast<T*>(a.c) + m * a.ldc + n0,
                                                  width, bias, residual_row);
  }
}

// The product for few rows of a (decode: one row per sequence) with the epilogue fused:
// c[m, n] = act(a[m, :] . b[n, :] + bias[n]) + residual[m, n] for output columns
// [n_begin, n_end). Memory bound on reading b (the weight), so it streams each weight row
// once for all m, four rows at a time: a tile of rows of a against them (dot_tile), or for
// a single row four independent accumulators (dot4_rows). a is converted to fp32 once per
// call. The sums of kChunk columns gather in an fp32 block, and the epilogue then runs
// over each row of it a vector at a time (GELU included), rounding once.
template <typename Fmt, Activation ACT, bool kBias, bool kResidual>
void skinny_gemm_act(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  using T = typename Fmt::storage;
  constexpr int64_t kChunk = 64;
  const int64_t k = a.k;
  std::vector<float> x(size_t(a.m * k)), sums(size_t(a.m * kChunk));
  for (int64_t m = 0; m < a.m; ++m) {
    load_rows<Fmt>(static_cast<const T*>(a.a) + m * a.lda, x.data() + m * k, k);
  }
  const T* w = static_cast<const T*>(a.b);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    const int64_t width = std::min(kChunk, n_end - n0);
    int64_t j = 0;
    for (; j + 4 <= width; j += 4) {
      const T* const rows[4] = {w + (n0 + j) * a.ldb, w + (n0 + j + 1) * a.ldb, w + (n0 + j + 2) * a.ldb,
                                w + (n0 + j + 3) * a.ldb};
      int64_t m = 0;
      // The first tile of rows of x prefetches the next four weight rows (prefetch_ahead).
      const auto ahead = [&] { return m == 0 ? 4 * a.ldb : int64_t(0); };
#ifdef GPTEXT_CPU_AVX2
      for (; m + kSkinnyTileRows <= a.m; m += kSkinnyTileRows) {
        dot_tile<Fmt, kSkinnyTileRows>(x.data() + m * k, k, rows, k, sums.data() + m * kChunk + j, kChunk, ahead());
      }
      if constexpr (kSkinnyTileRows > 2) {
        for (; m + 2 <= a.m; m += 2) {
          dot_tile<Fmt, 2>(x.data() + m * k, k, rows, k, sums.data() + m * kChunk + j, kChunk, ahead());
        }
      }
#endif
      for (; m < a.m; ++m) dot4_rows<Fmt>(x.data() + m * k, rows, k, sums.data() + m * kChunk + j, ahead());
    }
    for (; j < width; ++j) {
      for (int64_t m = 0; m < a.m; ++m) {
        sums[size_t(m * kChunk + j)] = dot_row<Fmt>(x.data() + m * k, w + (n0 + j) * a.ldb, k);
      }
    }
    skinny_epilogue<Fmt, ACT, kBias, kResidual>(a, sums.data(), kChunk, n0, width);
  }
}

template <typename Fmt>
void skinny_gemm_t(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  dispatch_epilogue(a, [&](auto act, auto bias, auto residual) {
    skinny_gemm_act<Fmt, decltype(act)::value, decltype(bias)::value, decltype(residual)::value>(a, n_begin, n_end);
  });
}

#ifdef GPTEXT_CPU_AVX512
// The skinny GEMM in bf16 where the processor has AVX512_BF16 (bf16_dot_product()): the
// rows of a and of the weight stay bf16, and VDPBF16PS multiplies 32 of each a vector,
// adding each pair of products into an fp32 lane, where the loop above converts every
// weight vector to fp32 first (two instructions per 16 values, then an FMA per row). The
// products of bf16 values are exact in fp32; VDPBF16PS treats subnormal inputs as zero and
// rounds its sums to nearest, flushing subnormal results.
#define GPTEXT_BF16DP \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512,avx512bf16")))

// acc[mr * 4 + r] += the products of the 32 values of x[mr] and w[r] from i on (those
// that mask keeps; the others load as zeros, which add nothing). A plain function, not a
// lambda: GCC compiles a lambda without its enclosing function's target.
template <int MR>
GPTEXT_BF16DP inline void dot_step_bf16dp(Vec::f32 (&acc)[kW], const uint16_t* x, int64_t ldx,
                                          const uint16_t* const (&w)[4], int64_t i, __mmask32 mask, int64_t ahead) {
  if (ahead != 0) prefetch_ahead<32>(w, i, ahead);
  __m512bh wv[4];
  for (int r = 0; r < 4; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[r] + i);
  for (int mr = 0; mr < MR; ++mr) {
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + mr * ldx + i);
    for (int r = 0; r < 4; ++r) acc[mr * 4 + r] = _mm512_dpbf16_ps(acc[mr * 4 + r], xv, wv[r]);
  }
}

// out[mr * ldo + r] = x[mr] . w[r] for mr < MR, r < 4 (x rows ldx apart): 4 * MR
// accumulators, the last k % 32 values through masked loads, and the 4 * MR sums from one
// Vec::sum_each.
template <int MR>
GPTEXT_BF16DP inline void dot_tile_bf16dp(const uint16_t* x, int64_t ldx, const uint16_t* const (&w)[4], int64_t k,
                                          float* out, int64_t ldo, int64_t ahead) {
  static_assert(MR >= 1 && 4 * MR <= kW, "a tile's sums fill at most one vector");
  Vec::f32 acc[kW];
  for (Vec::f32& v : acc) v = Vec::zero();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) dot_step_bf16dp<MR>(acc, x, ldx, w, i, ~__mmask32(0), ahead);
  if (i < k) dot_step_bf16dp<MR>(acc, x, ldx, w, i, __mmask32((1u << (k - i)) - 1u), ahead);
  alignas(64) float sums[kW];
  Vec::store(sums, Vec::sum_each(acc));
  for (int mr = 0; mr < MR; ++mr)
    for (int r = 0; r < 4; ++r) out[mr * ldo + r] = sums[mr * 4 + r];
}

// dot_tile_bf16dp<count> (count <= 4 rows of x) against four weight rows.
GPTEXT_BF16DP inline void dot_rows_bf16dp(int64_t count, const uint16_t* x, int64_t ldx,
                                          const uint16_t* const (&w)[4], int64_t k, float* out, int64_t ldo,
                                          int64_t ahead) {
  if (count == 4) return dot_tile_bf16dp<4>(x, ldx, w, k, out, ldo, ahead);
  if (count == 3) return dot_tile_bf16dp<3>(x, ldx, w, k, out, ldo, ahead);
  if (count == 2) return dot_tile_bf16dp<2>(x, ldx, w, k, out, ldo, ahead);
  return dot_tile_bf16dp<1>(x, ldx, w, k, out, ldo, ahead);
}

// skinny_gemm_act's loop on bf16 dot products: a's rows read in place (lda apart), four
// weight rows at a time against tiles of 4 rows (fewer at the end); the last columns of the
// range, fewer than four, repeat the last weight row and keep only the sums they own.
template <Activation ACT, bool kBias, bool kResidual>
GPTEXT_BF16DP void skinny_gemm_bf16dp_act(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  constexpr int64_t kChunk = 64;
  const uint16_t* x = static_cast<const uint16_t*>(a.a);
  const uint16_t* w = static_cast<const uint16_t*>(a.b);
  std::vector<float> sums(size_t(a.m * kChunk));
  alignas(64) float spill[4 * 4];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    const int64_t width = std::min(kChunk, n_end - n0);
    for (int64_t j = 0; j < width; j += 4) {
      const int64_t owned = std::min<int64_t>(4, width - j);
      const uint16_t* rows[4];
      for (int r = 0; r < 4; ++r) rows[r] = w + (n0 + j + std::min<int64_t>(r, owned - 1)) * a.ldb;
      for (int64_t m = 0; m < a.m; m += 4) {
        const int64_t count = std::min<int64_t>(4, a.m - m);
        // A full tile writes its sums straight into the block; a partial one spills first.
        float* dst = owned == 4 ? sums.data() + m * kChunk + j : spill;
        const int64_t ld = owned == 4 ? kChunk : 4;
        dot_rows_bf16dp(count, x + m * a.lda, a.lda, rows, a.k, dst, ld, m == 0 ? 4 * a.ldb : 0);
        if (owned < 4) {
          for (int64_t mr = 0; mr < count; ++mr)
            for (int64_t r = 0; r < owned; ++r) sums[size_t((m + mr) * kChunk + j + r)] = spill[mr * 4 + r];
        }
      }
    }
    skinny_epilogue<BF16, ACT, kBias, kResidual>(a, sums.data(), kChunk, n0, width);
  }
}

void skinny_gemm_bf16dp(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  dispatch_epilogue(a, [&](auto act, auto bias, auto residual) {
    skinny_gemm_bf16dp_act<decltype(act)::value, decltype(bias)::value, decltype(residual)::value>(a, n_begin, n_end);
  });
}
#endif

// Row t of head h of batch b of a (batch, head, position, dim) tensor with these strides.
template <typename T>
inline T* row_of(T* base, const int64_t* stride, int64_t b, int64_t h, int64_t t) {
  return base + b * stride[0] + h * stride[1] + t * stride[2];
}

#ifdef GPTEXT_CPU_AVX2
// attention_forward_t's pass for a head of NV vectors (head_dim = NV * kW), the query and
// the output accumulator held in registers. The scores come kW keys at a time: each key's
// products summed lane-wise, then the kW partial vectors folded into one vector of kW
// scores (Vec::sum_each), not a horizontal sum per key. The online softmax steps over
// kKeys keys, keeping its running sum as a vector; value rows are added into two sets of
// accumulators (even and odd keys) when NV is small, so that the FMAs of one key do not
// wait on the previous key's.
template <typename Fmt, int NV>
void attention_row_vectors(const AttentionArgs& a, int64_t task) {
  using T = typename Fmt::storage;
  using L = Lanes<Fmt>;
  constexpr int64_t kKeys = 4 * kW;
  constexpr int kSets = NV <= 4 ? 2 : 1;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t t = task % a.q_len, h = (task / a.q_len) % a.heads, b = task / (a.q_len * a.heads);
  const T* const q_row = row_of(static_cast<const T*>(a.q), a.q_stride, b, h, t);
  const T* const k_rows = row_of(static_cast<const T*>(a.k), a.k_stride, b, h / group, 0);
  const T* const v_rows = row_of(static_cast<const T*>(a.v), a.v_stride, b, h / group, 0);
  const int64_t k_step = a.k_stride[2], v_step = a.v_stride[2];
  const Vec::f32 q_scale = Vec::splat(a.scale * kLog2e);
  Vec::f32 q[NV], acc[kSets][NV];
  for (int i = 0; i < NV; ++i) {
    q[i] = Vec::mul(L::load(q_row + i * kW), q_scale);
    for (int set = 0; set < kSets; ++set) acc[set][i] = Vec::zero();
  }
  float m = a.sinks != nullptr ? a.sinks[h] * kLog2e : -INFINITY;
  float l_sink = a.sinks != nullptr ? 1.0f : 0.0f;
  Vec::f32 l = Vec::zero();
  alignas(64) float p[kKeys];
  const KeyRange keys = attention_row_keys(a, b, t);
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kKeys) {
    const int64_t n = std::min(kKeys, keys.end - j0), chunks = (n + kW - 1) / kW;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t in_chunk = std::min<int64_t>(kW, n - c * kW);
      Vec::f32 part[kW];
#pragma GCC unroll 16
      for (int j = 0; j < kW; ++j) {
        if (j < in_chunk) {
          const T* const key = k_rows + (j0 + c * kW + j) * k_step;
          Vec::f32 sum = Vec::mul(q[0], L::load(key));
          for (int i = 1; i < NV; ++i) sum = Vec::fmadd(q[i], L::load(key + i * kW), sum);
          part[j] = sum;
        } else {
          part[j] = Vec::zero();
        }
      }
      Vec::store(p + c * kW, Vec::sum_each(part));
      for (int64_t j = in_chunk; j < kW; ++j) p[c * kW + j] = -INFINITY;
    }
    Vec::f32 block_max = Vec::splat(-INFINITY);
    for (int64_t c = 0; c < chunks; ++c) block_max = Vec::max(Vec::load(p + c * kW), block_max);
    const float new_max = Vec::max_lanes(block_max);
    if (new_max > m) {
      const float correction = softmax_exp(m, new_max, 1.0f);
      const Vec::f32 c = Vec::splat(correction);
      l_sink *= correction;
      l = Vec::mul(l, c);
      for (int set = 0; set < kSets; ++set)
        for (int i = 0; i < NV; ++i) acc[set][i] = Vec::mul(acc[set][i], c);
      m = new_max;
    }
#pragma omp simd
    for (int64_t j = 0; j < chunks * kW; ++j) p[j] = softmax_exp(p[j], m, 1.0f);
    for (int64_t c = 0; c < chunks; ++c) l = Vec::add(l, Vec::load(p + c * kW));
    int64_t j = 0;
    for (; j + kSets <= n; j += kSets) {
      for (int set = 0; set < kSets; ++set) {
        const Vec::f32 w = Vec::splat(p[j + set]);
        const T* const value = v_rows + (j0 + j + set) * v_step;
        for (int i = 0; i < NV; ++i) acc[set][i] = Vec::fmadd(w, L::load(value + i * kW), acc[set][i]);
      }
    }
    for (; j < n; ++j) {
      const Vec::f32 w = Vec::splat(p[j]);
      const T* const value = v_rows + (j0 + j) * v_step;
      for (int i = 0; i < NV; ++i) acc[0][i] = Vec::fmadd(w, L::load(value + i * kW), acc[0][i]);
    }
  }
  const float total = l_sink + Vec::sum(l);
  const Vec::f32 inv = Vec::splat(softmax_inv_sum(total));
  T* const out_row = row_of(static_cast<T*>(a.out), a.out_stride, b, h, t);
  for (int i = 0; i < NV; ++i) {
    Vec::f32 sum = acc[0][i];
    for (int set = 1; set < kSets; ++set) sum = Vec::add(sum, acc[set][i]);
    L::template put<false>(out_row + i * kW, L::pack(Vec::mul(sum, inv)));
  }
  if (a.lse != nullptr) a.lse[task] = total > 0.0f ? (m + std::log2(total)) / kLog2e : -INFINITY;
}

// attention_row_vectors<Fmt, NV> for head_dim = NV * kW, NV <= 8: whether it served the
// tasks (false for any other head size).
template <typename Fmt>
bool attention_rows_in_registers(const AttentionArgs& a, int64_t task_begin, int64_t task_end) {
  if (a.head_dim % kW != 0) return false;
  auto run = [&](auto nv) {
    for (int64_t task = task_begin; task < task_end; ++task) attention_row_vectors<Fmt, decltype(nv)::value>(a, task);
    return true;
  };
  switch (a.head_dim / kW) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 6: return run(std::integral_constant<int, 6>{});
    case 7: return run(std::integral_constant<int, 7>{});
    case 8: return run(std::integral_constant<int, 8>{});
    default: return false;
  }
}
#endif

// One query row per task (task = (b * heads + h) * q_len + t): a flash-style pass over the
// row's keys in blocks (attention_row_vectors where the head is a few whole vectors),
// keeping the running max and sum (exp2 domain, scale folded into q) and rescaling the
// output accumulator when the max grows. A sink starts the row as a
// virtual key with no value: max = sink, sum = 1.
template <typename Fmt>
void attention_forward_t(const AttentionArgs& a, int64_t task_begin, int64_t task_end) {
#ifdef GPTEXT_CPU_AVX2
  if (attention_rows_in_registers<Fmt>(a, task_begin, task_end)) return;
#endif
  using T = typename Fmt::storage;
  constexpr int64_t kBlock = 64;
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads;
  std::vector<float> q(static_cast<size_t>(dim)), acc(static_cast<size_t>(dim)), scores(kBlock);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t t = task % a.q_len, h = (task / a.q_len) % a.heads, b = task / (a.q_len * a.heads);
    load_rows<Fmt>(row_of(static_cast<const T*>(a.q), a.q_stride, b, h, t), q.data(), dim);
    for (float& v : q) v *= a.scale * kLog2e;
    std::fill(acc.begin(), acc.end(), 0.0f);
    float m = a.sinks != nullptr ? a.sinks[h] * kLog2e : -INFINITY;
    float l = a.sinks != nullptr ? 1.0f : 0.0f;
    const KeyRange keys = attention_row_keys(a, b, t);
    for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kBlock) {
      const int64_t n = std::min(kBlock, keys.end - j0);
      auto key = [&](int64_t i) { return row_of(static_cast<const T*>(a.k), a.k_stride, b, h / group, j0 + i); };
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const T* const rows[4] = {key(j), key(j + 1), key(j + 2), key(j + 3)};
        dot4_rows<Fmt>(q.data(), rows, dim, scores.data() + j);
      }
      for (; j < n; ++j) scores[j] = dot_row<Fmt>(q.data(), key(j), dim);
      const float block_max = max_row(scores.data(), n);
      if (block_max > m) {
        const float correction = softmax_exp(m, block_max, 1.0f);
        l *= correction;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) acc[d] *= correction;
        m = block_max;
      }
      auto value = [&](int64_t i) { return row_of(static_cast<const T*>(a.v), a.v_stride, b, h / group, j0 + i); };
      l += exp_row(scores.data(), scores.data(), n, m, 1.0f);
      // Four value rows per sweep of the accumulator: a quarter of its loads and stores.
      for (j = 0; j + 4 <= n; j += 4) {
        const T* const rows[4] = {value(j), value(j + 1), value(j + 2), value(j + 3)};
        const float p[4] = {scores[j], scores[j + 1], scores[j + 2], scores[j + 3]};
        axpy_rows<Fmt, 4>(acc.data(), p, rows, dim);
      }
      for (; j < n; ++j) {
        const T* const rows[1] = {value(j)};
        const float p[1] = {scores[j]};
        axpy_rows<Fmt, 1>(acc.data(), p, rows, dim);
      }
    }
    const float inv = softmax_inv_sum(l);
    store_rows_fn<Fmt>(row_of(static_cast<T*>(a.out), a.out_stride, b, h, t), dim,
                       [&acc, inv](int64_t d) { return acc[d] * inv; });
    if (a.lse != nullptr) a.lse[task] = l > 0.0f ? (m + std::log2(l)) / kLog2e : -INFINITY;
  }
}

// ---- Blocked forward: several query rows against each key block ----------------------
// Rows of one (batch, kv head) as the GPU kernel numbers them: row r is query r % q_len of
// query head kv * group + r / q_len, so a decode step's grouped heads share a block. A task
// is R = attention_forward_row_block rows (16 or 32: the lanes of the vectors below). The
// forward holds their queries transposed, qt[d][r], scaled into the exp2 domain, so that
// per block of kKeyBlock keys the scores come out transposed too:
//   S^T = K Q^T  kMicroKeys keys at a time, a broadcast key element times the R query
//                elements of one d; keys are read in place (fp32) or from fp32 copies;
// each key's R scores are then one or two vectors with a row per lane, and the online
// softmax runs over all the rows at once (their maxima, rescalings, exponentials and sums
// are whole-vector operations, not one row's short loops); and
//   O += P V     kMicroRows rows at a time, a broadcast probability times a value row.
// The backward keeps rows of scores (S = Q K^T against a transposed key tile), kRowBlock
// rows at a time.
constexpr int64_t kRowBlock = 16, kKeyBlock = 64, kMicroRows = 4;
// 8 keys of one 16-lane zmm accumulator each with AVX-512; 4 keys of two ymm ones with AVX2
// (8 would need all 16 ymm registers for accumulators alone).
#ifdef GPTEXT_CPU_AVX512
constexpr int64_t kMicroKeys = 8;
#else
constexpr int64_t kMicroKeys = 4;
#endif

struct RowRef {
  int64_t head, t;
  KeyRange keys;
};

// The nr rows of (batch b, kv head kv) from row r0 on, into ref; returns the union of their
// key ranges (empty when none has a key).
inline KeyRange row_block(const AttentionArgs& a, int64_t b, int64_t kv, int64_t r0, int64_t nr, RowRef* ref) {
  const int64_t group = a.heads / a.kv_heads;
  int64_t lo = INT64_MAX, hi = 0;
  for (int64_t r = 0; r < nr; ++r) {
    RowRef& row = ref[r];
    row.head = kv * group + (r0 + r) / a.q_len;
    row.t = (r0 + r) % a.q_len;
    row.keys = attention_row_keys(a, b, row.t);
    if (row.keys.begin < row.keys.end) {
      lo = std::min(lo, row.keys.begin);
      hi = std::max(hi, row.keys.end);
    }
  }
  return lo < hi ? KeyRange{lo, hi} : KeyRange{0, 0};
}

#ifdef GPTEXT_CPU_AVX2
// One strip of tile_product_at: columns [col, col + W * kW) of c's MR rows, in MR x W
// accumulators that stay in registers for the whole sum over i.
template <int MR, int W, typename A, typename RowB>
GPTEXT_CPU_INLINE void tile_strip(A& a, RowB& b_row, int64_t k, int64_t col, float* c, int64_t c_stride,
                                  bool accumulate) {
  Vec::f32 acc[MR][W];
  for (int r = 0; r < MR; ++r) {
    for (int h = 0; h < W; ++h) acc[r][h] = accumulate ? Vec::load(c + r * c_stride + col + h * kW) : Vec::zero();
  }
  for (int64_t i = 0; i < k; ++i) {
    const float* b = b_row(i) + col;
    Vec::f32 bv[W];
    for (int h = 0; h < W; ++h) bv[h] = Vec::load(b + h * kW);
    for (int r = 0; r < MR; ++r) {
      const Vec::f32 ai = Vec::splat(a(r, i));
      for (int h = 0; h < W; ++h) acc[r][h] = Vec::fmadd(ai, bv[h], acc[r][h]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int h = 0; h < W; ++h) Vec::store(c + r * c_stride + col + h * kW, acc[r][h]);
  }
}
#endif

// The register-blocked product both directions of attention use:
//   c[r][:cols] (+)= sum over i < k of a(r, i) * b_row(i)[:cols]   for r < MR
// (c's rows c_stride apart; accumulate: add to c, else overwrite it). Each step of i
// broadcasts one a value per row against a strip of b's row, into accumulators that stay
// in registers for the whole sum (tile_strip): with AVX-512 and up to 4 rows, strips of
// four vectors a row (64 columns); then of two (32 columns with AVX-512, 16 with AVX2),
// then of one. The 2 x MR chains of the wide strips (MR chains of the narrow
// one, which the forward's scores run with MR = 8 under AVX-512) keep enough FMAs in
// flight to hide their latency on cores with two FMA units (AMD Zen 4 splits a 512-bit FMA
// over both: a zmm strip runs there as fast as two ymm ones; Intel's server cores have two
// 512-bit units).
template <int MR, typename A, typename RowB>
inline void tile_product_at(A&& a, RowB&& b_row, int64_t k, int64_t cols, float* c, int64_t c_stride,
                            bool accumulate) {
  int64_t col = 0;
#ifdef GPTEXT_CPU_AVX512
  // Up to 4 rows: strips of four vectors (64 columns, a whole head of 64), 16 accumulators
  // of the 32 zmm registers: per step, 4 loads of b and MR broadcasts feed 4 x MR FMAs,
  // where two-vector strips need 2 + MR for 2 x MR.
  if constexpr (MR <= 4) {
    for (; col + 4 * kW <= cols; col += 4 * kW) tile_strip<MR, 4>(a, b_row, k, col, c, c_stride, accumulate);
  }
#endif
#ifdef GPTEXT_CPU_AVX2
  for (; col + 2 * kW <= cols; col += 2 * kW) tile_strip<MR, 2>(a, b_row, k, col, c, c_stride, accumulate);
  for (; col + kW <= cols; col += kW) tile_strip<MR, 1>(a, b_row, k, col, c, c_stride, accumulate);
#endif
  for (int r = 0; r < MR; ++r) {
    float* out = c + r * c_stride;
    if (!accumulate) std::fill(out + col, out + cols, 0.0f);
    for (int64_t i = 0; i < k; ++i) {
      const float ai = a(r, i);
      const float* b = b_row(i);
#pragma omp simd
      for (int64_t j = col; j < cols; ++j) out[j] += ai * b[j];
    }
  }
}

// tile_product_at with a(r, i) = a[r * a_stride + i].
template <int MR, typename RowB>
inline void tile_product(const float* a, int64_t a_stride, RowB&& b_row, int64_t k, int64_t cols, float* c,
                         int64_t c_stride, bool accumulate) {
  tile_product_at<MR>([a, a_stride](int r, int64_t i) { return a[r * a_stride + i]; }, b_row, k, cols, c, c_stride,
                      accumulate);
}

// scores[r][j] = q[r] . kt[:, j] for r < MR, j < columns (kt: dim rows of transposed keys,
// kt_stride apart; scores' rows kKeyBlock apart).
template <int MR>
inline void scores_tile(const float* q, int64_t dim, const float* kt, int64_t kt_stride, int64_t columns,
                        float* scores) {
  tile_product<MR>(q, dim, [kt, kt_stride](int64_t d) { return kt + d * kt_stride; }, dim, columns, scores, kKeyBlock,
                   false);
}

// acc[r][:] += sum over j < n of p[r][j] * v[j][:] for r < MR (p's rows p_stride apart;
// v: n fp32 rows of dim; acc: MR rows of dim, contiguous).
template <int MR>
inline void values_tile(const float* p, int64_t p_stride, const float* const* v, int64_t n, int64_t dim, float* acc) {
  tile_product<MR>(p, p_stride, [v](int64_t j) { return v[j]; }, n, dim, acc, dim, true);
}

// fn(std::integral_constant<int, m>) with m = min(count, N), count >= 1: a micro-kernel's
// row count as a compile-time constant.
template <int N, typename Fn>
inline void with_count(int64_t count, Fn&& fn) {
  if constexpr (N > 1) {
    if (count < N) return with_count<N - 1>(count, fn);
  }
  fn(std::integral_constant<int, N>{});
}

template <typename Fn>
inline void with_micro_rows(int64_t rows, Fn&& fn) {
  with_count<kMicroRows>(rows, fn);
}

template <typename Fmt, int64_t R>
void attention_forward_blocked(const AttentionArgs& a, int64_t task_begin, int64_t task_end) {
  using T = typename Fmt::storage;
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads, rows = group * a.q_len;
  const int64_t row_tiles = (rows + R - 1) / R;
  std::unique_ptr<float[]> memory(new float[size_t(2 * dim * R + kKeyBlock * R + 2 * kKeyBlock * dim)]);
  float* qt = memory.get();       // dim x R: the rows' queries, transposed, scaled into the exp2 domain
  float* acc = qt + dim * R;      // R x dim
  float* st = acc + R * dim;      // kKeyBlock x R: scores, then probabilities, transposed
  float* kbuf = st + kKeyBlock * R;  // kKeyBlock x dim: a block's 16-bit keys in fp32
  float* vbuf = kbuf + kKeyBlock * dim;  // kKeyBlock x dim: a block's 16-bit values in fp32
  // 16-bit keys and values are converted to fp32 once per (batch, kv head) rather than once
  // per task when this thread runs several row tiles of one: cached[j] says whether key j
  // of the current (batch, kv head) is in kcache / vcache.
  constexpr bool k16 = !std::is_same_v<Fmt, F32>;
  const bool cache = k16 && row_tiles > 1 && task_end - task_begin > 1;
  std::vector<float> kcache, vcache;
  std::vector<char> cached;
  if (cache) {
    kcache.resize(size_t(a.k_len * dim));
    vcache.resize(size_t(a.k_len * dim));
    cached.resize(size_t(a.k_len));
  }
  int64_t cached_for = -1;  // the (batch, kv head) the cache holds
  const float* krow[kKeyBlock];
  const float* vrow[kKeyBlock];
  RowRef ref[R];
  // Per row (lane): running max and sum, and its key range; lanes past the task's rows
  // have no keys.
  float m[R], l[R];
  int64_t kb[R], ke[R];
  const float k2 = a.scale * kLog2e;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t r0 = (task % row_tiles) * R, kv = (task / row_tiles) % a.kv_heads;
    const int64_t b = task / (row_tiles * a.kv_heads);
    const int64_t nr = std::min(R, rows - r0);
    const KeyRange span = row_block(a, b, kv, r0, nr, ref);
    if (cache && cached_for != b * a.kv_heads + kv) {
      std::fill(cached.begin(), cached.end(), 0);
      cached_for = b * a.kv_heads + kv;
    }
    for (int64_t r = 0; r < R; ++r) {
      float* staged = acc;  // a row's query in fp32, before it is transposed
      if (r < nr) load_rows<Fmt>(row_of(static_cast<const T*>(a.q), a.q_stride, b, ref[r].head, ref[r].t), staged, dim);
      for (int64_t d = 0; d < dim; ++d) qt[d * R + r] = r < nr ? staged[d] * k2 : 0.0f;
      m[r] = r < nr && a.sinks != nullptr ? a.sinks[ref[r].head] * kLog2e : -INFINITY;
      l[r] = r < nr && a.sinks != nullptr ? 1.0f : 0.0f;
      kb[r] = r < nr ? ref[r].keys.begin : 0;
      ke[r] = r < nr ? ref[r].keys.end : 0;
    }
    std::fill(acc, acc + R * dim, 0.0f);
    for (int64_t j0 = span.begin; j0 < span.end; j0 += kKeyBlock) {
      const int64_t n = std::min(kKeyBlock, span.end - j0);
      for (int64_t j = 0; j < n; ++j) {
        const T* key = row_of(static_cast<const T*>(a.k), a.k_stride, b, kv, j0 + j);
        const T* value = row_of(static_cast<const T*>(a.v), a.v_stride, b, kv, j0 + j);
        if constexpr (!k16) {
          krow[j] = key;
          vrow[j] = value;
        } else {
          float* kf = cache ? kcache.data() + (j0 + j) * dim : kbuf + j * dim;
          float* vf = cache ? vcache.data() + (j0 + j) * dim : vbuf + j * dim;
          if (!cache || !cached[size_t(j0 + j)]) {
            load_rows<Fmt>(key, kf, dim);
            load_rows<Fmt>(value, vf, dim);
            if (cache) cached[size_t(j0 + j)] = 1;
          }
          krow[j] = kf;
          vrow[j] = vf;
        }
      }
      for (int64_t j = 0; j < n; j += kMicroKeys) {
        with_count<kMicroKeys>(n - j, [&](auto mk) {
          constexpr int MK = decltype(mk)::value;
          const float* const* keys = krow + j;
          tile_product_at<MK>([keys](int i, int64_t d) { return keys[i][d]; }, [qt](int64_t d) { return qt + d * R; },
                              dim, R, st + j * R, R, false);
        });
      }
      // Keys outside a row's range score -inf (only blocks at an edge of some row's range
      // need the test); then each row's block max, a lane of bm.
      bool edge = false;
      for (int64_t r = 0; r < nr; ++r) edge = edge || kb[r] > j0 || ke[r] < j0 + n;
      float bm[R];
      std::fill(bm, bm + R, -INFINITY);
      for (int64_t j = 0; j < n; ++j) {
        float* sj = st + j * R;
        if (edge) {
          const int64_t key = j0 + j;
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) sj[r] = (key >= kb[r]) & (key < ke[r]) ? sj[r] : -INFINITY;
        }
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) bm[r] = max_of(bm[r], sj[r]);
      }
      // A row whose max rises rescales its sum and output by 2^(old max - new max).
      float correction[R];
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) {
        const float raised = max_of(m[r], bm[r]);
        correction[r] = softmax_exp(m[r], raised, 1.0f);
        l[r] *= correction[r];
        m[r] = raised;
      }
      for (int64_t r = 0; r < nr; ++r) {
        if (correction[r] == 1.0f) continue;
        float* ar = acc + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) ar[d] *= correction[r];
      }
      for (int64_t j = 0; j < n; ++j) {
        float* sj = st + j * R;
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) {
          const float p = softmax_exp(sj[r], m[r], 1.0f);
          sj[r] = p;
          l[r] += p;
        }
      }
      for (int64_t r = 0; r < nr; r += kMicroRows) {
        with_micro_rows(nr - r, [&](auto mr) {
          constexpr int MR = decltype(mr)::value;
          const float* p = st + r;  // row r + i's probability for key j at p[j * R + i]
          tile_product_at<MR>([p](int i, int64_t j) { return p[j * R + i]; }, [&vrow](int64_t j) { return vrow[j]; }, n,
                              dim, acc + r * dim, dim, true);
        });
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const float inv = softmax_inv_sum(l[r]);
      const float* ar = acc + r * dim;
      store_rows_fn<Fmt>(row_of(static_cast<T*>(a.out), a.out_stride, b, ref[r].head, ref[r].t), dim,
                         [ar, inv](int64_t d) { return ar[d] * inv; });
      if (a.lse != nullptr) {
        a.lse[(b * a.heads + ref[r].head) * a.q_len + ref[r].t] =
            l[r] > 0.0f ? (m[r] + std::log2(l[r])) / kLog2e : -INFINITY;
      }
    }
  }
}

#ifdef GPTEXT_CPU_AVX512
// ---- bf16 forward on AMX tiles ----------------------------------------------------------
// Where the processor has AMX (amx_bf16()), the bf16 passes of the blocked forward (at
// least kAttentionBlockedMinRows query rows per (batch, kv head): prefill, and decode
// steps of grouped heads) run their two products on tiles: 16 rows of 64 bytes each, 8 of
// them, and TDPBF16PS, which multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16
// fp32 sums in one instruction (pairs of bf16 along the sum, "VNNI" layout for the second
// operand). A task (32 rows) is two chunks of 16; per block of kAmxKeys keys:
//   S = Q K^T     per chunk two tiles (16 keys each), over head_dim / 32 pairs of a Q tile
//                 (the rows' queries, unscaled bf16) and the block's packed key tiles,
//                 which both chunks share (amx_scores);
//   online softmax on the stored scores in fp32 vectors, the chunk's 16 rows at once for
//                 their maxima, sums and rescalings; P rounded to bf16, as the GPU's PV
//                 product takes it;
//   P V           tiles 4-7 (16 dims each) from a chunk's P tile and packed value tiles,
//                 then added into its fp32 output rows after their rescaling.
// Keys and values are packed once per (batch, kv head) a thread works on: keys as 16 x 16
// tiles of 32-bit pairs (row i: dims 2i, 2i + 1 of 16 keys), values as tiles whose row i
// holds keys 2i, 2i + 1 of 16 dims, interleaved. A decode step of a group of 8 heads
// reads each key and value once, so there the packing is most of the work: both packers
// run in vectors (a transpose of 16 x 16 pairs per key tile), and a group of 8 decodes
// 1.4-2.6x faster than in the fp32 vectors of attention_forward_blocked (Intel Xeon, one
// thread, 1024-8192 keys). Tile numbers are immediates, hence the spelled-out tiles 4-7.
constexpr int64_t kAmxKeys = 32, kAmxMaxDim = 256;

inline bool attention_forward_on_amx(const AttentionArgs& a) {
  return attention_forward_blocked_rows(a) && a.head_dim % 32 == 0 && a.head_dim <= kAmxMaxDim && amx_bf16();
}

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Memory for n values of T from a 64-byte boundary, left uninitialised: whole cache lines,
// so that no 64-byte tile row or vector store splits one.
template <typename T>
class LineAligned {
 public:
  LineAligned() = default;
  explicit LineAligned(size_t n) { reset(n); }
  void reset(size_t n) {
    memory_.reset(new T[n + 64 / sizeof(T)]);
    data_ = memory_.get() + (64 - reinterpret_cast<uintptr_t>(memory_.get()) % 64) % 64 / sizeof(T);
  }
  T* get() const { return data_; }

 private:
  std::unique_ptr<T[]> memory_;
  T* data_ = nullptr;
};

// r[i][j] <- r[j][i] for the 16 x 16 matrix of 32-bit lanes in r: pairs of lanes, then
// pairs of pairs, then 128-bit quarters in two steps.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(u[8 * h + i], u[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_f32x4(u[8 * h + i], u[8 * h + 4 + i], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

// One 16 x 16 tile of bf16 pairs from 16 rows of 32 values (row i at src + i * stride;
// rows from `rows` on, and values outside `mask`, as zeros): tile row p (16 values at out +
// 16 p) holds pair p (values 2p, 2p + 1) of every row, lane i from row i. The rows load as
// 16 vectors of pairs, transposed.
inline void amx_pair_tile(const uint16_t* src, int64_t stride, int64_t rows, __mmask32 mask, uint32_t* out) {
  __m512 r[16];
  for (int64_t i = 0; i < 16; ++i) {
    r[i] = i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, src + i * stride)) : _mm512_setzero_ps();
  }
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * 16, r[i]);
}

// Keys [0, n) of one (batch, kv head), rows `step` apart, into `padded` / 16 x dim / 32
// tiles (keys past n as zeros), each an amx_pair_tile of 16 keys' 32 dims.
inline void amx_pack_keys(const uint16_t* k, int64_t step, int64_t n, int64_t padded, int64_t dim, uint32_t* out) {
  const int64_t chunks = dim / 32;
  for (int64_t kb = 0; kb < padded / 16; ++kb) {
    const int64_t keys = std::max<int64_t>(0, std::min<int64_t>(16, n - kb * 16));
    for (int64_t c = 0; c < chunks; ++c) {
      amx_pair_tile(k + kb * 16 * step + c * 32, step, keys, ~__mmask32(0), out + (kb * chunks + c) * 256);
    }
  }
}

// Values [0, n) into `padded` / 32 x dim / 16 tiles: row i of a tile holds, for its 16
// dims, the values of keys 2i and 2i + 1 (low and high half of each 32-bit element).
inline void amx_pack_values(const uint16_t* v, int64_t step, int64_t n, int64_t padded, int64_t dim, uint32_t* out) {
  const int64_t dtiles = dim / 16;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t jb = 0; jb < padded / 32; ++jb) {
    for (int64_t e = 0; e < dtiles; ++e) {  // a tile's rows in order: its 1 KB written front to back
      uint32_t* tile = out + (jb * dtiles + e) * 256;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t j = jb * 32 + 2 * i;
        const __m256i lo = j < n ? Vec::load(v + j * step + e * 16) : zero;
        const __m256i hi = j + 1 < n ? Vec::load(v + (j + 1) * step + e * 16) : zero;
        const __m512i word = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
        _mm512_store_si512(tile + i * 16, word);
      }
    }
  }
}

// The AVX-512 build's targets, repeated: a function's target attribute starts from the command
// line's, not from the `#pragma GCC target` in force (GCC would not vectorise its loops).
#define GPTEXT_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512,amx-tile,amx-bf16")))

// S for one block of kAmxKeys keys and one or two 16-row chunks of queries (qbuf[0],
// qbuf[1], rows dim apart): chunk 0 in tiles 0 and 1 (16 keys each), chunk 1 in tiles 4
// and 5, per 32 dims a query tile for each (2, 6) against the block's two key tiles (3,
// 7), which both chunks share; stored into sbuf[0], sbuf[1] (rows kAmxKeys apart).
GPTEXT_AMX inline void amx_scores(const uint16_t* const (&qbuf)[2], bool pair, int64_t dim, const uint32_t* ktiles,
                                  float* const (&sbuf)[2]) {
  const int64_t chunks = dim / 32;
  _tile_zero(0);
  _tile_zero(1);
  if (pair) {
    _tile_zero(4);
    _tile_zero(5);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(3, ktiles + c * 256, 64);
    _tile_loadd(7, ktiles + (chunks + c) * 256, 64);
    _tile_loadd(2, qbuf[0] + c * 32, dim * 2);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 7);
    if (pair) {
      _tile_loadd(6, qbuf[1] + c * 32, dim * 2);
      _tile_dpbf16ps(4, 6, 3);
      _tile_dpbf16ps(5, 6, 7);
    }
  }
  _tile_stored(0, sbuf[0], kAmxKeys * 4);
  _tile_stored(1, sbuf[0] + 16, kAmxKeys * 4);
  if (pair) {
    _tile_stored(4, sbuf[1], kAmxKeys * 4);
    _tile_stored(5, sbuf[1] + 16, kAmxKeys * 4);
  }
}

// obuf[e][r][:] = P V for the (up to four) 16-dim tiles e of vtiles: P in tile 2, the
// products in tiles 4-7, each value tile loaded into its own tile (0, 1, 3, then 0 again)
// and every product issued before the first store waits on one.
GPTEXT_AMX inline void amx_values_product(const uint16_t* p, const uint32_t* vtiles, int64_t count, float* obuf) {
  _tile_loadd(2, p, 64);
  _tile_zero(4);
  _tile_loadd(0, vtiles, 64);
  _tile_dpbf16ps(4, 2, 0);
  if (count > 1) {
    _tile_zero(5);
    _tile_loadd(1, vtiles + 256, 64);
    _tile_dpbf16ps(5, 2, 1);
  }
  if (count > 2) {
    _tile_zero(6);
    _tile_loadd(3, vtiles + 512, 64);
    _tile_dpbf16ps(6, 2, 3);
  }
  if (count > 3) {
    _tile_zero(7);
    _tile_loadd(0, vtiles + 768, 64);
    _tile_dpbf16ps(7, 2, 0);
  }
  _tile_stored(4, obuf, 64);
  if (count > 1) _tile_stored(5, obuf + 256, 64);
  if (count > 2) _tile_stored(6, obuf + 512, 64);
  if (count > 3) _tile_stored(7, obuf + 768, 64);
}

// One 16-row chunk of the AMX forward: its rows, their running max and sum, the last
// block's rescaling, key ranges, and its buffers.
struct AmxChunk {
  RowRef ref[16];
  alignas(64) float m[16];
  alignas(64) float l[16];
  alignas(64) float correction[16];
  int64_t kb[16], ke[16];
  int64_t rows = 0;
  alignas(64) uint16_t q[16 * kAmxMaxDim];
  alignas(64) float s[16 * kAmxKeys];
  alignas(64) uint16_t p[16 * kAmxKeys];
};

// The blocked forward's tasks (R = 32 rows of a (batch, kv head) each), on AMX: a task's
// one or two 16-row chunks go through each key block together (they share its key tiles,
// and one chunk's softmax can run while the other's products are still in the tile unit).
GPTEXT_AMX void attention_forward_amx(const AttentionArgs& a, int64_t task_begin, int64_t task_end) {
  using T = uint16_t;
  // Tasks of 32 rows (attention_forward_row_block): with 16 rows or fewer a (batch, kv
  // head) has one task however its rows are counted, so blocks of 32 number them too.
  constexpr int64_t R = 32;
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads, rows = group * a.q_len;
  const int64_t row_tiles = (rows + R - 1) / R, chunks = dim / 32, dtiles = dim / 16;
  const int64_t padded = ceil_div(a.k_len, kAmxKeys) * kAmxKeys;
  // The packers write the blocks that hold a batch's written keys (zeros past the last of
  // them), and nothing reads further: no zero-filling here.
  const LineAligned<uint32_t> kpack(size_t(padded * dim / 2)), vpack(size_t(padded * dim / 2));
  int64_t packed_for = -1;
  std::unique_ptr<AmxChunk[]> chunk(new AmxChunk[2]);
  alignas(64) float obuf[4 * 256];
  std::vector<float> acc(size_t(2 * 16 * dim));
  AmxTileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
  const Vec::f32 k2 = Vec::splat(a.scale * kLog2e), minus_inf = Vec::splat(-INFINITY);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const uint16_t* const qbufs[2] = {chunk[0].q, chunk[1].q};
  float* const sbufs[2] = {chunk[0].s, chunk[1].s};
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t kv = (task / row_tiles) % a.kv_heads, b = task / (row_tiles * a.kv_heads);
    if (packed_for != b * a.kv_heads + kv) {
      // Only the keys written so far (kv_lens: a longer cache buffer's slots past them are never read).
      const int64_t written = attention_batch_keys(a, b).end;
      const int64_t blocks_end = ceil_div(written, kAmxKeys) * kAmxKeys;
      amx_pack_keys(row_of(static_cast<const T*>(a.k), a.k_stride, b, kv, 0), a.k_stride[2], written, blocks_end, dim,
                    kpack.get());
      amx_pack_values(row_of(static_cast<const T*>(a.v), a.v_stride, b, kv, 0), a.v_stride[2], written, blocks_end,
                      dim, vpack.get());
      packed_for = b * a.kv_heads + kv;
    }
    const int64_t first = (task % row_tiles) * R, task_rows = std::min(R, rows - first);
    const int64_t nchunks = (task_rows + 15) / 16;
    int64_t span_begin = INT64_MAX, span_end = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      AmxChunk& c = chunk[size_t(ch)];
      c.rows = std::min<int64_t>(16, task_rows - 16 * ch);
      const KeyRange span = row_block(a, b, kv, first + 16 * ch, c.rows, c.ref);
      if (span.begin < span.end) {
        span_begin = std::min(span_begin, span.begin);
        span_end = std::max(span_end, span.end);
      }
      for (int64_t r = 0; r < 16; ++r) {
        T* q = c.q + r * dim;
        const bool real = r < c.rows;
        if (real) {
          std::memcpy(q, row_of(static_cast<const T*>(a.q), a.q_stride, b, c.ref[r].head, c.ref[r].t), size_t(dim) * 2);
        } else {
          std::fill(q, q + dim, T(0));
        }
        c.m[r] = real && a.sinks != nullptr ? a.sinks[c.ref[r].head] * kLog2e : -INFINITY;
        c.l[r] = real && a.sinks != nullptr ? 1.0f : 0.0f;
        c.kb[r] = real ? c.ref[r].keys.begin : 0;
        c.ke[r] = real ? c.ref[r].keys.end : 0;
      }
      std::fill(c.p, c.p + 16 * kAmxKeys, T(0));
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j0 = span_begin < span_end ? span_begin / kAmxKeys * kAmxKeys : 0; j0 < span_end; j0 += kAmxKeys) {
      if (j0 + kAmxKeys < span_end) {  // the next block's key and value tiles, into L1 while this one runs
        const char* next_k = reinterpret_cast<const char*>(kpack.get() + ((j0 + kAmxKeys) / 16) * chunks * 256);
        const char* next_v = reinterpret_cast<const char*>(vpack.get() + ((j0 + kAmxKeys) / kAmxKeys) * dtiles * 256);
        for (int64_t byte = 0; byte < dim * kAmxKeys * 2; byte += 64) {
          _mm_prefetch(next_k + byte, _MM_HINT_T0);
          _mm_prefetch(next_v + byte, _MM_HINT_T0);
        }
      }
      amx_scores(qbufs, nchunks > 1, dim, kpack.get() + (j0 / 16) * chunks * 256, sbufs);
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        AmxChunk& c = chunk[size_t(ch)];
        // Each row's scores scaled and masked in place, and its block max: the 16 rows'
        // maxima, sums and rescalings are then vectors with a row per lane (Vec::max_each,
        // Vec::sum_each), not 16 horizontal reductions each.
        Vec::f32 row_max[16];
        for (int64_t r = 0; r < 16; ++r) {
          float* s = c.s + r * kAmxKeys;
          Vec::f32 s0 = minus_inf, s1 = minus_inf;
          if (r < c.rows) {
            s0 = Vec::mul(Vec::load(s), k2);
            s1 = Vec::mul(Vec::load(s + 16), k2);
            if (c.kb[r] > j0 || c.ke[r] < j0 + kAmxKeys) {  // keys outside the row's range score -inf
              const __m512i key0 = _mm512_add_epi32(lane, _mm512_set1_epi32(int(j0))),
                            key1 = _mm512_add_epi32(key0, _mm512_set1_epi32(16));
              const __m512i lo = _mm512_set1_epi32(int(c.kb[r])), hi = _mm512_set1_epi32(int(c.ke[r]));
              s0 = _mm512_mask_mov_ps(minus_inf, _mm512_cmpge_epi32_mask(key0, lo) & _mm512_cmplt_epi32_mask(key0, hi),
                                      s0);
              s1 = _mm512_mask_mov_ps(minus_inf, _mm512_cmpge_epi32_mask(key1, lo) & _mm512_cmplt_epi32_mask(key1, hi),
                                      s1);
            }
          }
          Vec::store(s, s0);
          Vec::store(s + 16, s1);
          row_max[r] = Vec::max(s1, Vec::max(s0, minus_inf));
        }
        // max_of(m, block max) per row; the rescaling 2^(m - raised), 0 where the row has
        // no finite max yet (softmax_exp's rule).
        const Vec::f32 old_max = Vec::load(c.m);
        const Vec::f32 raised = Vec::max(Vec::max_each(row_max), old_max);
        const __mmask16 seen = _mm512_cmp_ps_mask(raised, minus_inf, _CMP_NEQ_OQ);
        const Vec::f32 correction = _mm512_maskz_mov_ps(seen, exp2_lanes(_mm512_sub_ps(old_max, raised)));
        Vec::store(c.m, raised);
        Vec::store(c.correction, correction);
        Vec::f32 row_sum[16];
        for (int64_t r = 0; r < 16; ++r) {
          const float* s = c.s + r * kAmxKeys;
          Vec::f32 p0 = Vec::zero(), p1 = Vec::zero();
          if (c.m[r] != -INFINITY) {
            p0 = exp2_lanes(_mm512_sub_ps(Vec::load(s), Vec::splat(c.m[r])));
            p1 = exp2_lanes(_mm512_sub_ps(Vec::load(s + 16), Vec::splat(c.m[r])));
          }
          row_sum[r] = Vec::add(p0, p1);
          Vec::store(c.p + r * kAmxKeys, Vec::to_bf16(p0));
          Vec::store(c.p + r * kAmxKeys + 16, Vec::to_bf16(p1));
        }
        Vec::store(c.l, Vec::fmadd(Vec::load(c.l), correction, Vec::sum_each(row_sum)));
      }
      const uint32_t* vtiles = vpack.get() + (j0 / kAmxKeys) * dtiles * 256;
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const AmxChunk& c = chunk[size_t(ch)];
        for (int64_t e0 = 0; e0 < dtiles; e0 += 4) {
          const int64_t count = std::min<int64_t>(4, dtiles - e0);
          amx_values_product(c.p, vtiles + e0 * 256, count, obuf);
          for (int64_t r = 0; r < c.rows; ++r) {
            const Vec::f32 scale = Vec::splat(c.correction[r]);
            for (int64_t e = 0; e < count; ++e) {
              float* out = acc.data() + (ch * 16 + r) * dim + (e0 + e) * 16;
              Vec::store(out, Vec::fmadd(Vec::load(out), scale, Vec::load(obuf + e * 256 + r * 16)));
            }
          }
        }
      }
    }
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const AmxChunk& c = chunk[size_t(ch)];
      for (int64_t r = 0; r < c.rows; ++r) {
        const Vec::f32 inv = Vec::splat(softmax_inv_sum(c.l[r]));
        const float* ar = acc.data() + (ch * 16 + r) * dim;
        T* out = row_of(static_cast<T*>(a.out), a.out_stride, b, c.ref[r].head, c.ref[r].t);
        for (int64_t d = 0; d < dim; d += 16) Vec::store(out + d, Vec::to_bf16(Vec::mul(Vec::load(ar + d), inv)));
        if (a.lse != nullptr) {
          a.lse[(b * a.heads + c.ref[r].head) * a.q_len + c.ref[r].t] =
              c.l[r] > 0.0f ? (c.m[r] + std::log2(c.l[r])) / kLog2e : -INFINITY;
        }
      }
    }
  }
  _tile_release();
}

// The bf16 GEMM on AMX tiles, where amx_bf16() holds: from kAmxSkinnyMinRows rows (decode
// batches, see kSkinnyMaxRowsAmx) to prefill and training. The weight is the A operand: a
// tile is 16 weight rows (output columns) by 32 k values, exactly as the weight stores
// them, read in place or, when enough rows share it, from a contiguous copy of the column
// block's tiles (kAmxPanelMinBlocks). The rows of a, packed in blocks of 16 into bf16
// pairs (amx_pack_rows: row p of a block's tile holds a[m][2p], a[m][2p + 1] for its 16
// rows m), are the B operand, so C[n][m] = sum over k of W[n][k] a[m][k]: a C tile is 16 output columns by 16
// rows, transposed (in registers) on its way to the epilogue. Four C tiles, 32 columns by
// 32 rows, share each step's two weight tiles and two row tiles. Weight tiles past the
// last column or past K are zero-padded copies (a tile load would read past the rows).
//
// The weight is bound to be read from memory (once per call when the packed rows fit the
// L2 cache; kAmxChunkBytes), so a call's threads split the output columns, in blocks of
// kAmxCols. Measured on an Intel Xeon (2 threads), against oneDNN's GEMM (ATen's, also on
// AMX): see kAmxGemmMaxRows in ops.cpp. At one row the dot products (skinny_gemm_bf16dp)
// were a little faster (768->2304: 46 against 49 us). Prefetching the next columns'
// weight rows during a block's first rows gained nothing here.
constexpr int64_t kAmxCols = kAmxColBlock, kAmxSkinnyMinRows = 2;
// Rows of a packed per pass over the weight: as many 32-row pairs of blocks as keep the
// packed rows within about 1 MB (half the L2 of the Xeon measured).
constexpr int64_t kAmxChunkBytes = int64_t(1) << 20;
// Blocks of 16 rows (in a chunk) from which each column block's weight tiles are copied
// into a contiguous panel (amx_pack_weight_panel) for the chunk's pairs of blocks to share:
// whole 1 KB tiles on 64-byte lines, where the weight in place gives 16 rows of 64 bytes a
// row stride apart. On the Xeon measured (one thread, x768->2304 +b, alternating rounds)
// the copy loses at 64 rows (0.52 against 0.58 ms) and gains from 96: 0.67 -> 0.63 ms at
// 96, 0.89 -> 0.76 at 128, 3.16 -> 2.41 at 512, 6.42 -> 4.88 at 1024; 512x3072->768 +b+res
// 4.4 -> 4.2 ms, 512x768->3072 +b+gelu 5.2 -> 4.4 ms. Two threads splitting the columns
// gained less (the host's two processors ran the tile products no faster than one):
// 512x768->2304 2.78 -> 2.50 ms, +gelu to 3072 4.63 -> 4.21 ms, 128 rows 0.85 -> 0.82 ms,
// and 512x3072->768 within its noise (3.2-3.8 ms either way).
constexpr int64_t kAmxPanelMinBlocks = 6;

inline int64_t amx_padded_k(int64_t k) { return (k + 31) / 32 * 32; }

// The 16-bit lanes of values [kk, kk + 32) that lie below k (all 32 but in the last step).
inline __mmask32 amx_k_mask(int64_t kk, int64_t k) {
  const int64_t width = std::min<int64_t>(32, k - kk);
  return width == 32 ? ~__mmask32(0) : __mmask32((1u << width) - 1u);
}

// Weight rows [n, n + rows) (rows <= 16), values [kk, kk + 32) clipped at k, zero-padded
// into buf (16 x 32).
inline void amx_weight_tail(const uint16_t* w, int64_t ldb, int64_t n, int64_t rows, int64_t kk, int64_t k,
                            uint16_t* buf) {
  const int64_t width = std::min<int64_t>(32, k - kk);
  std::memset(buf, 0, 16 * 32 * sizeof(uint16_t));
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf + r * 32, w + (n + r) * ldb + kk, size_t(width) * sizeof(uint16_t));
}

// Blocks [block_begin, block_end) of 16 rows of a into packed (amx_packed_size values):
// block b's tiles at packed + b * amx_padded_k(k) * 8, row p of them holding pairs p of
// the block's rows, zeros past k and past the last row: per 32 k values an amx_pair_tile,
// masked at k (nothing is read past a row).
GPTEXT_AMX void amx_pack_rows_avx512(const GemmArgs& a, uint32_t* packed, int64_t block_begin, int64_t block_end) {
  const uint16_t* x = static_cast<const uint16_t*>(a.a);
  const int64_t padded = amx_padded_k(a.k);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t rows = std::min<int64_t>(16, a.m - b * 16);
    uint32_t* out = packed + b * (padded / 2) * 16;
    for (int64_t kk = 0; kk < padded; kk += 32) {
      amx_pair_tile(x + b * 16 * a.lda + kk, a.lda, rows, amx_k_mask(kk, a.k), out + kk / 2 * 16);
    }
  }
}

// Where a weight tile (rows [n, n + rows), values [kk, kk + 32)) loads from, and its row
// stride in bytes: the weight itself, or the zero-padded copy in tail.
struct AmxSource {
  const void* at;
  int64_t stride;
};
inline AmxSource amx_weight_source(const uint16_t* w, int64_t ldb, int64_t n, int64_t rows, int64_t kk, int64_t k,
                                   uint16_t* tail) {
  if (rows == 16 && kk + 32 <= k) return {w + n * ldb + kk, ldb * int64_t(sizeof(uint16_t))};
  amx_weight_tail(w, ldb, n, rows, kk, k, tail);
  return {tail, 64};
}

// Weight rows [n, n + cols) (cols <= 32), every k, as a column block's weight tiles,
// contiguous: tile i (rows n + 16 i ...) of values [kk, kk + 32) at panel + (kk / 32 * 2 +
// i) * 512, zero past the last column and past k. Read row by row, 64 bytes at a time.
GPTEXT_AMX inline void amx_pack_weight_panel(const uint16_t* w, int64_t ldb, int64_t n, int64_t cols, int64_t k,
                                             uint16_t* panel) {
  const int64_t padded = amx_padded_k(k);
  for (int64_t r = 0; r < 32; ++r) {
    uint16_t* out = panel + (r / 16) * 512 + (r % 16) * 32;
    if (r >= cols) {
      for (int64_t kk = 0; kk < padded; kk += 32) _mm512_store_si512(out + kk * 32, _mm512_setzero_si512());
      continue;
    }
    const uint16_t* row = w + (n + r) * ldb;
    for (int64_t kk = 0; kk < padded; kk += 32) {
      _mm512_store_si512(out + kk * 32, _mm512_maskz_loadu_epi16(amx_k_mask(kk, k), row + kk));
    }
  }
}

// One block of output: columns [n, n + cols) (cols <= 32: two weight tiles when kTwoCols),
// rows of the packed blocks xb and, when kTwoRows, the next one; sums of C tile t into
// cbuf[t] (16 columns x 16 rows). The weight tiles come from panel (amx_pack_weight_panel)
// when there is one, else from the weight in place (amx_weight_source). Tile numbers are
// immediates: C tiles 0-3 (weight tile i, row block j at 2 * i + j), the weight tiles 4
// and 5, the row tiles 6 and 7.
template <bool kTwoCols, bool kTwoRows>
GPTEXT_AMX inline void amx_block(const uint16_t* w, int64_t ldb, int64_t n, int64_t cols, const uint16_t* panel,
                                 const uint32_t* xb, int64_t block_stride, int64_t k, uint16_t (&tail)[2][16 * 32],
                                 float (&cbuf)[4][256]) {
  _tile_zero(0);
  if (kTwoRows) _tile_zero(1);
  if (kTwoCols) _tile_zero(2);
  if (kTwoCols && kTwoRows) _tile_zero(3);
  const int64_t padded = amx_padded_k(k);
  auto weight_tile = [&](int i, int64_t kk) {
    return panel != nullptr ? AmxSource{panel + (kk / 32 * 2 + i) * 512, 64}
                            : amx_weight_source(w, ldb, n + 16 * i, i == 0 ? std::min<int64_t>(16, cols) : cols - 16,
                                                kk, k, tail[i]);
  };
  for (int64_t kk = 0; kk < padded; kk += 32) {
    const AmxSource w0 = weight_tile(0, kk);
    _tile_loadd(4, w0.at, w0.stride);
    _tile_loadd(6, xb + kk / 2 * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (kTwoRows) {
      _tile_loadd(7, xb + block_stride + kk / 2 * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (kTwoCols) {
      const AmxSource w1 = weight_tile(1, kk);
      _tile_loadd(5, w1.at, w1.stride);
      _tile_dpbf16ps(2, 5, 6);
      if (kTwoRows) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf[0], 64);
  if (kTwoRows) _tile_stored(1, cbuf[1], 64);
  if (kTwoCols) _tile_stored(2, cbuf[2], 64);
  if (kTwoCols && kTwoRows) _tile_stored(3, cbuf[3], 64);
}

template <Activation ACT, bool kBias, bool kResidual>
GPTEXT_AMX void gemm_amx_act(const GemmArgs& a, const uint32_t* packed, int64_t n_begin, int64_t n_end) {
  const int64_t padded = amx_padded_k(a.k), blocks = (a.m + 15) / 16, block_stride = padded * 8;
  const uint16_t* w = static_cast<const uint16_t*>(a.b);
  std::vector<uint32_t> own;
  if (packed == nullptr) {  // few rows: this thread packs them itself
    own.resize(size_t(blocks * block_stride));
    amx_pack_rows_avx512(a, own.data(), 0, blocks);
    packed = own.data();
  }
  const int64_t chunk_blocks =  // all of them when k is 0 (sums of nothing: the epilogue alone)
      block_stride == 0 ? blocks
                        : std::max<int64_t>(2, kAmxChunkBytes / (block_stride * int64_t(sizeof(uint32_t))) / 2 * 2);
  alignas(64) float cbuf[4][256];
  alignas(64) float sums[32 * kAmxCols];
  alignas(64) uint16_t tail[2][16 * 32];
  // A column block's weight tiles, copied once per chunk of rows (kAmxPanelMinBlocks).
  LineAligned<uint16_t> panel_memory;
  uint16_t* panel = nullptr;
  if (std::min(chunk_blocks, blocks) >= kAmxPanelMinBlocks) {
    panel_memory.reset(size_t(padded * 32));
    panel = panel_memory.get();
  }
  // C tile 2i + j of the block of columns [n, n + cols) and rows [m0, m1): column n + 16 i +
  // (tile row), row m0 + 16 j + (lane), transposed into sums (row-major, kAmxCols wide),
  // then the epilogue over its rows. (Deferring each block's epilogue until the next
  // block's tile products were issued, for the vector and tile units to overlap, measured
  // no faster.)
  auto finish = [&](int64_t n, int64_t cols, int64_t m0, int64_t m1) {
    for (int i = 0; i < (cols > 16 ? 2 : 1); ++i) {
      for (int j = 0; j < (m1 - m0 > 16 ? 2 : 1); ++j) {
        __m512 r[16];
        for (int l = 0; l < 16; ++l) r[l] = _mm512_load_ps(cbuf[2 * i + j] + l * 16);
        transpose16(r);
        for (int l = 0; l < 16; ++l) _mm512_store_ps(sums + (16 * j + l) * kAmxCols + 16 * i, r[l]);
      }
    }
    skinny_epilogue<BF16, ACT, kBias, kResidual>(a, sums, kAmxCols, n, cols, m0, m1);
  };
  AmxTileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
  for (int64_t c0 = 0; c0 < blocks; c0 += chunk_blocks) {
    const int64_t c1 = std::min(blocks, c0 + chunk_blocks);
    for (int64_t n = n_begin; n < n_end; n += kAmxCols) {
      const int64_t cols = std::min(kAmxCols, n_end - n);
      const bool two_cols = cols > 16;
      if (panel) amx_pack_weight_panel(w, a.ldb, n, cols, a.k, panel);
      for (int64_t b = c0; b < c1; b += 2) {
        const bool two_rows = b + 1 < c1;
        const uint32_t* xb = packed + b * block_stride;
        if (two_cols) {
          if (two_rows) amx_block<true, true>(w, a.ldb, n, cols, panel, xb, block_stride, a.k, tail, cbuf);
          else amx_block<true, false>(w, a.ldb, n, cols, panel, xb, block_stride, a.k, tail, cbuf);
        } else {
          if (two_rows) amx_block<false, true>(w, a.ldb, n, cols, panel, xb, block_stride, a.k, tail, cbuf);
          else amx_block<false, false>(w, a.ldb, n, cols, panel, xb, block_stride, a.k, tail, cbuf);
        }
        finish(n, cols, b * 16, std::min(a.m, b * 16 + (two_rows ? 32 : 16)));
      }
    }
  }
  _tile_release();
}

void gemm_amx_tiles(const GemmArgs& a, const uint32_t* packed, int64_t n_begin, int64_t n_end) {
  dispatch_epilogue(a, [&](auto act, auto bias, auto residual) {
    gemm_amx_act<decltype(act)::value, decltype(bias)::value, decltype(residual)::value>(a, packed, n_begin, n_end);
  });
}
#undef GPTEXT_AMX
#endif

// One (batch, kv head) per task, so that the key and value gradients, which every query
// head of the group adds to, have a single writer. Its rows (query head of the group,
// query) go in blocks of kRowBlock against kKeyBlock-key blocks, as in the blocked forward:
// per key block the keys and values are converted once, transposed for S = Q K^T and
// dP = dO V^T and as rows for dQ += dS K; the probabilities are recomputed from the saved
// log-sum-exp, p = exp(scale q.k - lse), ds = p (dp - delta); then dV += P^T dO and
// dK += dS^T Q for the block's keys.
template <typename Fmt>
void attention_backward_t(const AttentionGradArgs& g, int64_t task_begin, int64_t task_end) {
  using T = typename Fmt::storage;
  const AttentionArgs& a = g.fwd;
  const int64_t dim = a.head_dim, group = a.heads / a.kv_heads, rows = group * a.q_len;
  const int64_t grad_q_stride[3] = {a.heads * a.q_len * dim, a.q_len * dim, dim};
  const int64_t grad_kv_stride[3] = {a.kv_heads * a.k_len * dim, a.k_len * dim, dim};
  const float score_scale = a.scale * kLog2e;
  std::vector<float> dk(static_cast<size_t>(a.k_len * dim)), dv(static_cast<size_t>(a.k_len * dim));
  // The task's keys in fp32 (rows, for dQ += dS K) and its keys and values transposed
  // (dim rows of k_pad, for S = Q K^T and dP = dO V^T), made once per task rather than
  // once per row block; keys past k_len are zeros, 16 more than any block's products
  // (which run 16 columns at a time from any key j0) can read.
  const int64_t k_pad = a.k_len + 16;
  std::vector<float> keys_fp32(static_cast<size_t>(a.k_len * dim)), kt(static_cast<size_t>(dim * k_pad)),
      vt(static_cast<size_t>(dim * k_pad)), value(static_cast<size_t>(dim));
  std::unique_ptr<float[]> memory(new float[size_t(3 * kRowBlock * dim + 2 * kRowBlock * kKeyBlock +
                                                   kMicroRows * kKeyBlock + 2 * kKeyBlock * kRowBlock)]);
  float* q = memory.get();                    // kRowBlock x dim
  float* dout = q + kRowBlock * dim;          // kRowBlock x dim
  float* dq = dout + kRowBlock * dim;         // kRowBlock x dim
  float* p = dq + kRowBlock * dim;            // kRowBlock x kKeyBlock: scores, then probabilities
  float* ds = p + kRowBlock * kKeyBlock;      // kRowBlock x kKeyBlock
  float* dp = ds + kRowBlock * kKeyBlock;     // kMicroRows x kKeyBlock
  float* pt = dp + kMicroRows * kKeyBlock;    // kKeyBlock x kRowBlock: P transposed
  float* dst = pt + kKeyBlock * kRowBlock;    // kKeyBlock x kRowBlock: dS transposed
  const float* key_rows[kKeyBlock];
  const float *q_rows[kRowBlock], *dout_rows[kRowBlock];
  RowRef ref[kRowBlock];
  float lse[kRowBlock], delta[kRowBlock];
  for (int64_t i = 0; i < kRowBlock; ++i) {
    q_rows[i] = q + i * dim;
    dout_rows[i] = dout + i * dim;
  }
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.kv_heads, kv = task % a.kv_heads;
    std::fill(dk.begin(), dk.end(), 0.0f);
    std::fill(dv.begin(), dv.end(), 0.0f);
    for (int64_t j = 0; j < a.k_len; ++j) {  // (columns k_len.. stay the zeros they were made with)
      float* key = keys_fp32.data() + j * dim;
      load_rows<Fmt>(row_of(static_cast<const T*>(a.k), a.k_stride, b, kv, j), key, dim);
      load_rows<Fmt>(row_of(static_cast<const T*>(a.v), a.v_stride, b, kv, j), value.data(), dim);
      for (int64_t d = 0; d < dim; ++d) {
        kt[size_t(d * k_pad + j)] = key[d];
        vt[size_t(d * k_pad + j)] = value[size_t(d)];
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, rows - r0);
      const KeyRange span = row_block(a, b, kv, r0, nr, ref);
      const int64_t lo = span.begin, hi = span.end;
      for (int64_t r = 0; r < nr; ++r) {
        const RowRef& row = ref[r];
        load_rows<Fmt>(row_of(static_cast<const T*>(a.q), a.q_stride, b, row.head, row.t), q + r * dim, dim);
        load_rows<Fmt>(row_of(static_cast<const T*>(g.grad_out), g.grad_out_stride, b, row.head, row.t),
                       dout + r * dim, dim);
        std::fill(dq + r * dim, dq + (r + 1) * dim, 0.0f);
        const int64_t index = (b * a.heads + row.head) * a.q_len + row.t;
        lse[r] = a.lse[index] * kLog2e;
        delta[r] = g.delta[index];
      }
      for (int64_t j0 = lo; j0 < hi; j0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, hi - j0);
        const int64_t columns = (n + 15) / 16 * 16;  // j0 + columns < k_len + 16 = k_pad
        for (int64_t j = 0; j < n; ++j) key_rows[j] = keys_fp32.data() + (j0 + j) * dim;
        for (int64_t r = 0; r < nr; r += kMicroRows) {
          with_micro_rows(std::min(kMicroRows, nr - r), [&](auto mr) {
            constexpr int MR = decltype(mr)::value;
            scores_tile<MR>(q + r * dim, dim, kt.data() + j0, k_pad, columns, p + r * kKeyBlock);
            scores_tile<MR>(dout + r * dim, dim, vt.data() + j0, k_pad, columns, dp);
            for (int i = 0; i < MR; ++i) {
              const KeyRange keys = ref[r + i].keys;
              const int64_t jb = std::clamp<int64_t>(keys.begin - j0, 0, n);
              const int64_t je = std::clamp<int64_t>(keys.end - j0, jb, n);
              float* pi = p + (r + i) * kKeyBlock;
              float* dsi = ds + (r + i) * kKeyBlock;
              const float* dpi = dp + i * kKeyBlock;
              const float lse_i = lse[r + i], delta_i = delta[r + i];
              std::fill(pi, pi + jb, -INFINITY);  // as in the forward: no condition in the loop
              std::fill(pi + je, pi + n, -INFINITY);
#pragma omp simd
              for (int64_t j = 0; j < n; ++j) {
                const float pj = softmax_exp(pi[j] * score_scale, lse_i, 1.0f);
                pi[j] = pj;
                dsi[j] = pj * (dpi[j] - delta_i);
              }
            }
            values_tile<MR>(ds + r * kKeyBlock, kKeyBlock, key_rows, n, dim, dq + r * dim);
          });
        }
        for (int64_t r = 0; r < nr; ++r) {
          for (int64_t j = 0; j < n; ++j) {
            pt[j * kRowBlock + r] = p[r * kKeyBlock + j];
            dst[j * kRowBlock + r] = ds[r * kKeyBlock + j];
          }
        }
        for (int64_t j = 0; j < n; j += kMicroRows) {
          with_micro_rows(std::min(kMicroRows, n - j), [&](auto mr) {
            constexpr int MR = decltype(mr)::value;
            values_tile<MR>(pt + j * kRowBlock, kRowBlock, dout_rows, nr, dim, dv.data() + (j0 + j) * dim);
            values_tile<MR>(dst + j * kRowBlock, kRowBlock, q_rows, nr, dim, dk.data() + (j0 + j) * dim);
          });
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const float* dq_r = dq + r * dim;
        store_rows_fn<Fmt>(row_of(static_cast<T*>(g.grad_q), grad_q_stride, b, ref[r].head, ref[r].t), dim,
                           [dq_r, &a](int64_t d) { return dq_r[d] * a.scale; });
      }
    }
    for (int64_t j = 0; j < a.k_len; ++j) {
      const float* dk_j = dk.data() + j * dim;
      store_rows_fn<Fmt>(row_of(static_cast<T*>(g.grad_k), grad_kv_stride, b, kv, j), dim,
                         [dk_j, &a](int64_t d) { return dk_j[d] * a.scale; });
      store_rows<Fmt>(dv.data() + j * dim, row_of(static_cast<T*>(g.grad_v), grad_kv_stride, b, kv, j), dim);
    }
  }
}

// dispatch(), plus whether the outputs (each rows x cols) are streamed: when the call moves
// at least stream_min_traffic() bytes (`tensors` rows x cols tensors read or written) and
// no output is larger than kFreshOutputBytes: fn(format tag, std::integral_constant<bool,
// stream>).
template <typename Fn>
void dispatch_streamed(DType dtype, int64_t rows, int64_t cols, int tensors, Fn&& fn) {
  dispatch(dtype, [&](auto tag) {
    const int64_t output_bytes = rows * cols * int64_t(sizeof(typename decltype(tag)::storage));
    if (output_bytes * tensors >= stream_min_traffic() && output_bytes <= kFreshOutputBytes) {
      fn(tag, std::true_type{});
    } else {
      fn(tag, std::false_type{});
    }
  });
}

}  // namespace

void softmax_rows(DType dtype, const SoftmaxArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch_streamed(dtype, args.rows, args.cols, 2, [&](auto tag, auto stream) {
    softmax_rows_t<decltype(tag), decltype(stream)::value>(args, row_begin, row_end);
  });
}

void layernorm_rows(DType dtype, const NormArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch_streamed(dtype, args.rows, args.cols, args.residual != nullptr ? 4 : 2, [&](auto tag, auto stream) {
    layernorm_rows_t<decltype(tag), decltype(stream)::value>(args, row_begin, row_end);
  });
}

void epilogue_rows(DType dtype, const GemmArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) { epilogue_rows_t<decltype(tag)>(args, row_begin, row_end); });
}

void epilogue_block(DType dtype, const GemmArgs& args, const float* sums, int64_t ld, int64_t n0, int64_t width,
                    int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) {
    dispatch_epilogue(args, [&](auto act, auto bias, auto residual) {
      skinny_epilogue<decltype(tag), decltype(act)::value, decltype(bias)::value, decltype(residual)::value>(
          args, sums + row_begin * ld, ld, n0, width, row_begin, row_end);
    });
  });
}

void skinny_gemm(DType dtype, const GemmArgs& args, int64_t n_begin, int64_t n_end) {
#ifdef GPTEXT_CPU_AVX512
  if (dtype == DType::BF16 && args.m >= kAmxSkinnyMinRows && amx_bf16()) {
    return gemm_amx_tiles(args, nullptr, n_begin, n_end);
  }
  if (dtype == DType::BF16 && bf16_dot_product()) return skinny_gemm_bf16dp(args, n_begin, n_end);
#endif
  dispatch(dtype, [&](auto tag) { skinny_gemm_t<decltype(tag)>(args, n_begin, n_end); });
}

void attention_forward(DType dtype, const AttentionArgs& args, int64_t task_begin, int64_t task_end) {
#ifdef GPTEXT_CPU_AVX512
  if (dtype == DType::BF16 && attention_forward_on_amx(args)) return attention_forward_amx(args, task_begin, task_end);
#endif
  dispatch(dtype, [&](auto tag) {
    if (attention_forward_blocked_rows(args)) {
      if (attention_forward_row_block(args) == 16) {
        attention_forward_blocked<decltype(tag), 16>(args, task_begin, task_end);
      } else {
        attention_forward_blocked<decltype(tag), 32>(args, task_begin, task_end);
      }
    } else {
      attention_forward_t<decltype(tag)>(args, task_begin, task_end);
    }
  });
}

void attention_backward(DType dtype, const AttentionGradArgs& args, int64_t task_begin, int64_t task_end) {
  dispatch(dtype, [&](auto tag) { attention_backward_t<decltype(tag)>(args, task_begin, task_end); });
}

#ifdef GPTEXT_CPU_AVX512
void amx_pack_rows(const GemmArgs& args, uint32_t* packed, int64_t block_begin, int64_t block_end) {
  amx_pack_rows_avx512(args, packed, block_begin, block_end);
}

void gemm_amx(const GemmArgs& args, const uint32_t* packed, int64_t n_begin, int64_t n_end) {
  gemm_amx_tiles(args, packed, n_begin, n_end);
}
#else
// Never called: amx_bf16() holds only where the AVX-512 build is in use.
void amx_pack_rows(const GemmArgs&, uint32_t*, int64_t, int64_t) { throw std::logic_error("gptext: no AMX in this build"); }
void gemm_amx(const GemmArgs&, const uint32_t*, int64_t, int64_t) { throw std::logic_error("gptext: no AMX in this build"); }
#endif

void rope_rows(DType dtype, const RopeArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) { rope_rows_t<decltype(tag)>(args, row_begin, row_end); });
}

void cross_entropy_rows(DType dtype, const CrossEntropyArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch(dtype, [&](auto tag) { cross_entropy_rows_t<decltype(tag)>(args, row_begin, row_end); });
}

void cross_entropy_backward_rows(DType dtype, const CrossEntropyArgs& args, int64_t row_begin, int64_t row_end) {
  dispatch_streamed(dtype, args.rows, args.cols, 2, [&](auto tag, auto stream) {
    cross_entropy_backward_rows_t<decltype(tag), decltype(stream)::value>(args, row_begin, row_end);
  });
}

void to_storage(DType dtype, const float* src, void* dst, int64_t n) {
  dispatch(dtype, [&](auto tag) {
    using Fmt = decltype(tag);
    store_rows<Fmt>(src, static_cast<typename Fmt::storage*>(dst), n);
  });
}

void from_storage(DType dtype, const void* src, float* dst, int64_t n) {
  dispatch(dtype, [&](auto tag) {
    using Fmt = decltype(tag);
    load_rows<Fmt>(static_cast<const typename Fmt::storage*>(src), dst, n);
  });
}

}  // namespace gptext::cpu::GPTEXT_CPU_ISA
