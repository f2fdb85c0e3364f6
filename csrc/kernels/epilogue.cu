// The fused epilogue of `linear`, applied in place to a product computed elsewhere (the
// cuBLAS path of the GEMM policy): c = act(c + bias) + residual. Element-wise and memory
// bound; 128-bit accesses when rows and pointers allow, with the same linear_epilogue()
// as the WMMA GEMM, so both paths compute the same function.
#include "launch.h"

namespace gptext::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(const GemmArgs a) {
  T* c = static_cast<T*>(a.c);
  const T* bias = static_cast<const T*>(a.bias);
  const T* residual = static_cast<const T*>(a.residual);
  const int64_t packs_per_row = a.n / VEC;  // VEC divides n
  const int64_t total = a.m * packs_per_row;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = p / packs_per_row, col = (p % packs_per_row) * VEC;
    T* out = c + row * a.ldc + col;
    float v[VEC], b[VEC] = {}, r[VEC] = {};
    if constexpr (VEC > 1) {
      dev::load_floats<VEC>(out, v);
      if (bias != nullptr) dev::load_floats<VEC>(bias + col, b);
      if (residual != nullptr) dev::load_floats<VEC>(residual + row * a.ldc + col, r);
    } else {
      v[0] = dev::to_float(*out);
      if (bias != nullptr) b[0] = dev::to_float(bias[col]);
      if (residual != nullptr) r[0] = dev::to_float(residual[row * a.ldc + col]);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = linear_epilogue(v[e], b[e], a.act, r[e]);
    if constexpr (VEC > 1) {
      dev::store_floats<VEC>(out, v);
    } else {
      *out = dev::from_float<T>(v[0]);
    }
  }
}

template <typename T>
cudaError_t launch_epilogue(const GemmArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = a.n % kVec == 0 && a.ldc % kVec == 0 && dev::is_aligned(a.c, 16) &&
                         dev::is_aligned(a.bias, 16) && dev::is_aligned(a.residual, 16);
  const int64_t packs = a.m * (vectorize ? a.n / kVec : a.n);
  const unsigned grid = dev::capped_grid(ceil_div(packs, 256));
  if (vectorize) {
    epilogue_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a);
  } else {
    epilogue_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gemm_epilogue(const GemmArgs& args, DType dtype, cudaStream_t stream) {
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  if (args.bias == nullptr && args.residual == nullptr && args.act == Activation::None) return cudaSuccess;
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] { return launch_epilogue<T>(args, stream); });
}

}  // namespace gptext::kernels
