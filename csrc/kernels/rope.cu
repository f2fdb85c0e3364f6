// RoPE on the two halves of each head (RopeArgs in args.h): one read of x, cos and sin,
// one write of the rotated rows. Memory bound, so each thread moves 128 bits of each half
// of a row (VEC elements of the first half and the matching ones of the second) where the
// row strides and pointers allow it, one element of each otherwise. The output is
// contiguous: attention reads it as (batch, heads, positions, head_dim) without a copy.
#include "launch.h"

namespace gptext::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rope_kernel(const RopeArgs a) {
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t half = a.head_dim / 2;
  const int64_t packs = half / VEC;  // VEC divides half
  const int64_t total = a.batch * a.heads * a.positions * packs;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = p / packs, i = (p % packs) * VEC;
    const int64_t t = row % a.positions, h = row / a.positions % a.heads, b = row / (a.positions * a.heads);
    const T* src = x + b * a.x_stride[0] + h * a.x_stride[1] + t * a.x_stride[2] + i;
    const int64_t angle = (b * a.positions + t) * half + i;
    float lo[VEC], hi[VEC], c[VEC], s[VEC];
    if constexpr (VEC > 1) {
      dev::load_floats<VEC>(src, lo);
      dev::load_floats<VEC>(src + half, hi);
      dev::load_floats<VEC>(a.cos + angle, c);
      dev::load_floats<VEC>(a.sin + angle, s);
    } else {
      lo[0] = dev::to_float(src[0]);
      hi[0] = dev::to_float(src[half]);
      c[0] = a.cos[angle];
      s[0] = a.sin[angle];
    }
    float r_lo[VEC], r_hi[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      r_lo[e] = lo[e] * c[e] - hi[e] * s[e];
      r_hi[e] = hi[e] * c[e] + lo[e] * s[e];
    }
    T* dst = out + row * a.head_dim + i;
    if constexpr (VEC > 1) {
      dev::store_floats<VEC>(dst, r_lo);
      dev::store_floats<VEC>(dst + half, r_hi);
    } else {
      dst[0] = dev::from_float<T>(r_lo[0]);
      dst[half] = dev::from_float<T>(r_hi[0]);
    }
  }
}

template <typename T>
cudaError_t launch_rope(const RopeArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t half = a.head_dim / 2;
  // cos and sin are read kVec floats at a time too: their rows start every `half` floats,
  // aligned for a pack of kVec floats when kVec divides half (and the allocations are).
  const bool vectorize = half % kVec == 0 && a.x_stride[0] % kVec == 0 && a.x_stride[1] % kVec == 0 &&
                         a.x_stride[2] % kVec == 0 && dev::is_aligned(a.x, 16) && dev::is_aligned(a.out, 16) &&
                         dev::is_aligned(a.cos, 4 * kVec) && dev::is_aligned(a.sin, 4 * kVec);
  const int64_t packs = a.batch * a.heads * a.positions * (vectorize ? half / kVec : half);
  const unsigned grid = dev::capped_grid(ceil_div(packs, kThreads));
  if (vectorize) {
    rope_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a);
  } else {
    rope_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rope_forward(const RopeArgs& args, DType dtype, cudaStream_t stream) {
  if (args.head_dim % 2 != 0 || args.head_dim < 0) return cudaErrorInvalidValue;
  if (args.batch == 0 || args.heads == 0 || args.positions == 0 || args.head_dim == 0) return cudaSuccess;
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] { return launch_rope<T>(args, stream); });
}

}  // namespace gptext::kernels
