// CPU implementations of gptext's ops, row by row: csrc/ops.cpp splits the rows over threads
// with at::parallel_for and calls these on each range [row_begin, row_end). They take the
// same argument structs as the CUDA launchers (csrc/kernels/args.h) and call the same math
// (csrc/kernels/*.cuh). No torch headers, so the native tests link them too.
//
// The implementation (cpu_impl.h) is compiled three times, for baseline x86-64, with
// AVX2 + FMA + F16C and with AVX-512 as well; these entry points pick one at run time from
// what the processor supports (active_isa below).
#pragma once

#include "../kernels/args.h"

namespace gptext::cpu {

#define GPTEXT_CPU_KERNELS                                                                \
  void softmax_rows(DType dtype, const SoftmaxArgs& args, int64_t row_begin, int64_t row_end); \
  /* CrossEntropyArgs' forward (loss, lse) and backward (dx) for rows [row_begin, row_end). */  \
  void cross_entropy_rows(DType dtype, const CrossEntropyArgs& args, int64_t row_begin, int64_t row_end); \
  void cross_entropy_backward_rows(DType dtype, const CrossEntropyArgs& args, int64_t row_begin,         \
                                   int64_t row_end);                                                     \
  void layernorm_rows(DType dtype, const NormArgs& args, int64_t row_begin, int64_t row_end);  \
  /* Rows (b, h, t) [row_begin, row_end) of RopeArgs' x, flattened in that order. */          \
  void rope_rows(DType dtype, const RopeArgs& args, int64_t row_begin, int64_t row_end);      \
  /* In place: c = act(c + bias) + residual, for the rows given (GemmArgs' epilogue part). */   \
  void epilogue_rows(DType dtype, const GemmArgs& args, int64_t row_begin, int64_t row_end);  \
  /* c[m, n0 + j] = act(sums[m * ld + j] + bias[n0 + j]) + residual[m, n0 + j] for j < width and \
     rows [row_begin, row_end): the epilogue of a block of output columns whose fp32 sums a   \
     GEMM left in `sums`, rounded once into c (GemmArgs' epilogue part). */                     \
  void epilogue_block(DType dtype, const GemmArgs& args, const float* sums, int64_t ld, int64_t n0, \
                      int64_t width, int64_t row_begin, int64_t row_end);                         \
  /* The whole linear for few rows (decode: see kSkinnyMaxRows*), output columns [n_begin, n_end). */ \
  void skinny_gemm(DType dtype, const GemmArgs& args, int64_t n_begin, int64_t n_end);         \
  /* Tasks [task_begin, task_end) of attention_forward_tasks(args). */                          \
  void attention_forward(DType dtype, const AttentionArgs& args, int64_t task_begin, int64_t task_end); \
  /* (batch, kv head) pairs [task_begin, task_end), flattened. */                               \
  void attention_backward(DType dtype, const AttentionGradArgs& args, int64_t task_begin, int64_t task_end); \
  /* bf16 GEMM on AMX tiles (only where amx_bf16()): blocks [block_begin, block_end) of 16     \
     rows of args.a packed into `packed` (amx_packed_size(m, k) values), then output columns  \
     [n_begin, n_end) from them, or from rows each call packs itself when packed is null. */  \
  void amx_pack_rows(const GemmArgs& args, uint32_t* packed, int64_t block_begin, int64_t block_end); \
  void gemm_amx(const GemmArgs& args, const uint32_t* packed, int64_t n_begin, int64_t n_end);  \
  /* n fp32 values rounded to the storage format as every kernel stores them, and back. */     \
  void to_storage(DType dtype, const float* src, void* dst, int64_t n);                         \
  void from_storage(DType dtype, const void* src, float* dst, int64_t n);

GPTEXT_CPU_KERNELS

// attention_forward's tasks: with at least this many query rows per (batch, kv head) (query
// heads of a group x queries), blocks of rows share each key block: one task per block of
// 32 rows of a (batch, kv head), or of 16 where there are no more than 16 rows (a decode
// step of grouped heads), since every row of a block costs a vector lane whether it exists
// or not. With fewer (a decode step without grouped heads), one task per query row.
constexpr int64_t kAttentionBlockedMinRows = 4;
inline bool attention_forward_blocked_rows(const AttentionArgs& a) {
  return (a.heads / a.kv_heads) * a.q_len >= kAttentionBlockedMinRows;
}
inline int64_t attention_forward_row_block(const AttentionArgs& a) {
  return (a.heads / a.kv_heads) * a.q_len <= 16 ? 16 : 32;
}
inline int64_t attention_forward_tasks(const AttentionArgs& a) {
  if (!attention_forward_blocked_rows(a)) return a.batch * a.heads * a.q_len;
  const int64_t rows = (a.heads / a.kv_heads) * a.q_len, block = attention_forward_row_block(a);
  return a.batch * a.kv_heads * ((rows + block - 1) / block);
}

// Up to this many rows, `linear` streams the weight once in skinny_gemm (decode steps)
// instead of calling a general GEMM.
constexpr int64_t kSkinnyMaxRows = 8;

// Whether the processor multiplies bf16 pairs natively (AVX512_BF16's dot products, which
// ATen's oneDNN GEMM uses) and the AVX-512 build is in use: then a bf16 GEMM of more than
// kSkinnyMaxRowsNativeBf16 rows runs in bf16 rather than converted to fp32 (3x faster at
// 512x768->2304 on AMD Zen 4), and the skinny GEMM multiplies on those dot products, up to
// that many rows where the processor has no AMX (with AMX, kSkinnyMaxRowsAmx). Against
// F.linear (oneDNN on the same dot products) on an AMD EPYC (Zen 4, 2 threads), two rounds
// of alternating processes: 5-8 rows 1.9-3.2x at 768->2304 and 1.9-3.8x at 768->50257; 12
// rows 1.4-1.7x, 1.0-1.2x at 3072->768, 1.8-2.7x at 768->50257; 16 rows 1.2-1.5x, 0.9-1.1x
// at 3072->768, 1.7x at 768->50257; at 24-32 rows 3072->768 fell to 0.9-1.1x. (On an Intel
// Xeon with AMX, against oneDNN's GEMM on AMX tiles, these dot products lost from 8 rows:
// 0.82x at 8 rows of 768->2304.)
bool bf16_dot_product();
constexpr int64_t kSkinnyMaxRowsNativeBf16 = 16;

// The same for fp16: whether the processor computes in fp16 (AVX512_FP16, which ATen's
// oneDNN fp16 GEMM uses; fp32 accumulation) and the AVX-512 build is in use. Then an fp16
// GEMM of more than kSkinnyMaxRowsNativeF16 rows runs in fp16 (measured on an Intel Xeon:
// 16x768->3072 0.78 ms in fp16 against 1.58 ms converted to fp32), fewer rows in the
// skinny GEMM (1.5-2.5x faster than ATen's fp16 GEMM at 2-8 rows there).
bool fp16_arithmetic();
constexpr int64_t kSkinnyMaxRowsNativeF16 = 8;

// Where amx_bf16() holds, bf16 products of up to this many rows run in the skinny GEMM,
// those of two rows or more on AMX tiles (the weight read in place as the A operand, the
// rows as B: a tile's 16 columns): 2.2-2.8x oneDNN's bf16 GEMM at 2-16 rows of
// 768->2304 on an Intel Xeon, 1.7-1.9x at 768->50257.
constexpr int64_t kSkinnyMaxRowsAmx = 16;

// The bf16 GEMM on AMX tiles (gemm_amx) packs the rows in blocks of kAmxRowBlock (a tile's
// 16 lanes) and computes kAmxColBlock output columns a block (two tiles). Its packed rows:
// per block, K rounded up to 32, in 32-bit pairs.
constexpr int64_t kAmxRowBlock = 16, kAmxColBlock = 32;
inline int64_t amx_packed_size(int64_t m, int64_t k) {
  return (m + kAmxRowBlock - 1) / kAmxRowBlock * ((k + 31) / 32 * 32 / 2 * kAmxRowBlock);
}

// Whether bf16 attention forward passes with at least kAttentionBlockedMinRows query rows
// per (batch, kv head) run on AMX tiles (attention_forward_amx): the processor has AMX-TILE
// and AMX-BF16, the kernel granted this process the tile state (arch_prctl), the AVX-512
// build is in use, and the environment variable GPTEXT_CPU_AMX is not 0 (read once).
bool amx_bf16();

// A call that moves at least this many bytes (inputs read plus outputs written) writes its
// outputs with streaming stores where the build has them: its data can't all stay in the
// last-level cache, so the outputs would be evicted before the next op reads them anyway,
// and a streaming store saves reading each output line into the cache first. Below it, the
// outputs (often a reused, cache-resident buffer) are better left to ordinary stores. The
// last-level cache's size as the C library reports it (sysconf), else 32 MB, but at most
// 16 MB per online processor: a virtual machine sees its whole socket's cache, most of which
// other tenants use. The environment variable GPTEXT_CPU_STREAM_BYTES overrides it (read
// once). Measured on an
// AMD EPYC host with a 32 MB L3, against eager PyTorch, streamed / not streamed: fp32
// layernorm_residual 4096x768 (48 MB) 1.34-1.51x / 1.17-1.23x, fp32 softmax 4096x1024
// (32 MB) 1.20-1.24x / 1.03-1.11x; fp32 softmax 16384x128 (16 MB) 0.64-0.85x /
// 1.12-1.14x, bf16 layernorm_residual 4096x768 (24 MB) 0.99-1.11x / 1.14-1.16x. On an
// Intel Xeon VM with 2 processors and a reported 300 MB L3, in rounds against eager, streamed
// / not: fp32 layernorm_residual 4096x768 (50 MB) 1.61x / 1.11x, 1024x2880 (47 MB) 1.37x /
// 1.07x; fp32 softmax 4096x1024 (34 MB) 1.38x / 1.23x, 256x50257 (103 MB) 1.49x / 1.14x
// (an earlier softmax gave 0.91x / 1.10x there).
int64_t stream_min_traffic();

// The environment variable `name` as a decimal integer of at least `minimum`, else
// `fallback` (unset, or not such a number). For the tuning knobs read once at first use.
int64_t env_integer(const char* name, int64_t minimum, int64_t fallback);

// Outputs larger than this are not streamed, however much the call moves. glibc's malloc
// takes a block this large straight from mmap (its dynamic mmap threshold stops at 32 MiB
// on 64-bit systems), so every call writes fresh pages, which the kernel has just zeroed
// into the cache: ordinary stores then land in cached lines, while streaming stores write
// around them and the zeroed lines still go back to memory. Measured on the Intel Xeon VM,
// fp32 softmax of 50257 columns, streamed / not: 160 rows (32 MB output) 3.6 / 4.9-5.1 ms,
// 256 rows (51 MB) 30.7-31.4 / 20.4-23.7 ms, 512 rows (103 MB) 60 / 35-49 ms; fp32
// layernorm_residual 16384x768 (two 50 MB outputs) 50-55 / 43-45 ms. With torch's
// THP_MEM_ALLOC_ENABLE=1 (huge pages, fewer faults) the two were even above 32 MB.
constexpr int64_t kFreshOutputBytes = int64_t(32) << 20;

// The builds of the kernels, in the order of what they need of the processor.
enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };
const char* isa_name(Isa isa);
// The widest build this processor can run.
Isa supported_isa();
// The build the entry points above use: supported_isa(), or a narrower one named by the
// environment variable GPTEXT_CPU_ISA (baseline, avx2, avx512; read once), to compare the
// builds or test one on a wider machine. A wider one than the processor has is not used.
Isa active_isa();

namespace baseline {
GPTEXT_CPU_KERNELS
}
namespace avx2 {
GPTEXT_CPU_KERNELS
}
namespace avx512 {
GPTEXT_CPU_KERNELS
}

}  // namespace gptext::cpu
