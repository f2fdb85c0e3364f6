// What the compiled kernels can run on. A kernel with no binary (and no PTX) compatible with
// a device fails cudaFuncGetAttributes there, which is how gptext decides, per device,
// whether its CUDA kernels are usable or whether to fall back to the reference.
#include "launch.h"

namespace gptext::kernels {
namespace {
__global__ void probe_kernel() {}
}  // namespace

int kernels_binary_arch(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  cudaFuncAttributes attributes{};
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  (void)cudaGetLastError();  // a missing image is an answer here, not a sticky error
  (void)cudaSetDevice(previous);
  return err == cudaSuccess ? attributes.binaryVersion : 0;
}

int kernels_cuda_version() { return CUDART_VERSION; }

}  // namespace gptext::kernels
