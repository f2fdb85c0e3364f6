// Tensor-core and asynchronous-copy primitives (sm_80+), as thin wrappers over PTX:
// cp.async (global -> shared, 16 bytes, zero-filling past the source), ldmatrix (8x8 b16
// tiles from shared memory into the fragment layout of mma.sync), and mma.sync m16n8k16
// with fp32 accumulation.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and
// c = lane % 4:
//   A (16x16, row-major), four b32 registers of two b16 each:
//     a[0] = (row g,     cols 2c, 2c+1)    a[1] = (row g + 8, cols 2c, 2c+1)
//     a[2] = (row g,     cols 2c+8, +9)    a[3] = (row g + 8, cols 2c+8, +9)
//   B (16x8, "col"), two registers:  b[0] = (rows 2c, 2c+1, col g)  b[1] = (rows 2c+8, +9, col g)
//   C (16x8, fp32), four floats:     c[0..1] = (row g, cols 2c, 2c+1)  c[2..3] = (row g + 8, same)
// So the C tiles of two adjacent 8-column blocks, rounded to b16 in pairs, are exactly the A
// fragment of the 16x16 block they form: a product can feed the next one from registers.
#pragma once

#include "common.cuh"

#if defined(__CUDACC__)
namespace gptext::dev {

__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Copies `src_bytes` (0..16) bytes from global to shared memory and zero-fills the rest of
// the 16; with 0 the source is not read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes));
}
// The same for one 4-byte word (src_bytes 0 or 4), through L1.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l passes the address of row (l % 8) of matrix (l / 8), and
// register i receives matrix i in the A/B fragment layout above.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
// The same, each matrix transposed on the way: for a B operand stored k-major.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// d += a (16x16) * b (16x8), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The A fragment of a 16x16 block from the C tiles of its two 8-column halves.
template <typename T>
__device__ __forceinline__ void c_pair_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack2<T>(left[0], left[1]);
  a[1] = pack2<T>(left[2], left[3]);
  a[2] = pack2<T>(right[0], right[1]);
  a[3] = pack2<T>(right[2], right[3]);
}

}  // namespace gptext::dev
#endif  // __CUDACC__
