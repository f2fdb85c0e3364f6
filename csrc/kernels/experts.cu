// The expert linear layers of a mixture of experts (ExpertArgs in args.h), for the few
// routes of a decode step: each route multiplies one row by its expert's matrix, so the
// product is a matrix-vector product per route, bound by reading the expert's weights.
//
// A block owns kWarps * kRows consecutive weight rows of one route; each warp kRows of
// them. The warp walks K with every lane taking VEC consecutive elements (one 128-bit load
// of x, then one of each of its kRows weight rows: a warp reads 512 contiguous bytes of a
// row per step), accumulates in fp32, and reduces across lanes with shuffles. kRows is even,
// so a warp holds whole (gate, linear) pairs and applies the SwiGLU itself. Rows, pointers
// or K that do not allow 128-bit loads take the scalar form (one element per lane a step).
// The routes' expert indices are read on the device: nothing is copied back to the host,
// so the call can be captured in a CUDA graph.
#include "launch.h"

namespace gptext::kernels {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 4;                       // weight rows (output columns before SwiGLU) a warp
constexpr int kBlockRows = kWarps * kRows;     // weight rows a block
constexpr int64_t kMaxGridY = 65535;           // routes beyond it are looped over

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) expert_linear_kernel(const ExpertArgs a) {
  const T* x_base = static_cast<const T*>(a.x);
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = int64_t(blockIdx.x) * kBlockRows + int64_t(warp) * kRows;  // first weight row
  if (row0 >= a.n) return;  // whole warps only: the shuffles below need every lane
  const int64_t routes = a.tokens * a.slots;
  const int64_t out_cols = a.swiglu ? a.n / 2 : a.n;
  for (int64_t route = blockIdx.y; route < routes; route += gridDim.y) {
    const int64_t e = a.experts[route];
    if (e < 0 || e >= a.num_experts) {
      if (lane == 0) {
        for (int j = 0; j < kRows; j += a.swiglu ? 2 : 1) {
          const int64_t col = a.swiglu ? (row0 + j) / 2 : row0 + j;
          if (row0 + j < a.n) out[route * out_cols + col] = dev::from_float<T>(__int_as_float(0x7fc00000));
        }
      }
      continue;
    }
    const T* x = x_base + (a.x_per_route ? route : route / a.slots) * a.k;
    const T* w = weight + (e * a.n + row0) * a.k;
    const int rows = int(a.n - row0 < kRows ? a.n - row0 : kRows);
    float acc[kRows] = {};
    if constexpr (VEC > 1) {
      for (int64_t k0 = int64_t(lane) * VEC; k0 < a.k; k0 += 32 * VEC) {
        float xv[VEC];
        dev::load_floats<VEC>(x + k0, xv);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (j < rows) {
            float wv[VEC];
            dev::load_floats<VEC>(w + j * a.k + k0, wv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[j] = fmaf(wv[i], xv[i], acc[j]);
          }
        }
      }
    } else {
      for (int64_t k0 = lane; k0 < a.k; k0 += 32) {
        const float xv = dev::to_float(x[k0]);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (j < rows) acc[j] = fmaf(dev::to_float(w[j * a.k + k0]), xv, acc[j]);
        }
      }
    }
    // Each row's sum, plus its bias, rounded to the storage type as a linear layer's output.
    float h[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const float b = (bias != nullptr && j < rows) ? dev::to_float(bias[e * a.n + row0 + j]) : 0.0f;
      h[j] = dev::round_to<T>(dev::warp_sum(acc[j]) + b);
    }
    if (lane == 0) {
      if (a.swiglu) {  // row0 and kRows are even, and so is n: pairs are whole
#pragma unroll
        for (int j = 0; j < kRows; j += 2) {
          if (j < rows) out[route * out_cols + (row0 + j) / 2] = dev::from_float<T>(swiglu_clamped(h[j], h[j + 1], a.limit));
        }
      } else {
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (j < rows) out[route * out_cols + row0 + j] = dev::from_float<T>(h[j]);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_expert_linear(const ExpertArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = a.k % kVec == 0 && dev::is_aligned(a.x, 16) && dev::is_aligned(a.weight, 16);
  const int64_t routes = a.tokens * a.slots;
  const dim3 grid(unsigned(ceil_div(a.n, kBlockRows)), unsigned(routes < kMaxGridY ? routes : kMaxGridY));
  if (vectorize) {
    expert_linear_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(a);
  } else {
    expert_linear_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t expert_linear_forward(const ExpertArgs& args, DType dtype, cudaStream_t stream) {
  if (args.tokens == 0 || args.slots == 0 || args.n == 0) return cudaSuccess;
  if (args.num_experts <= 0 || args.k < 0 || (args.swiglu && args.n % 2 != 0) || args.experts == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div(args.n, kBlockRows) > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  return GPTEXT_DISPATCH_DTYPE(dtype, T, [&] { return launch_expert_linear<T>(args, stream); });
}

}  // namespace gptext::kernels
