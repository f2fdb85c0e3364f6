// The math of softmax, shared by the CUDA kernels (softmax.cu) and the CPU implementation.
//
// A row is softmax(scale * x) over the keys that the row's query may see. Probabilities are
// computed as 2^((x - max) * scale * log2(e)): one multiply-add and the hardware exp2.
// Positions outside the key range, and every position of a row with no visible key, are 0.
#pragma once

#include "common.cuh"

namespace gptext {

// Keys [begin, end) visible to one query.
struct KeyRange {
  int64_t begin;
  int64_t end;
};

// The attention mask, as a softmax over a (..., q_len, k_len) score tensor sees it.
// Queries are aligned to the end of the keys: query i sits at position k_len - q_len + i,
// so decode (q_len == 1) and chunked prefill share one rule. With causal, a query sees the
// keys at or before its position; a window > 0 further limits it to the last `window` of
// those (the query itself included). Keys before k_start (left padding) are never seen.
GPTEXT_HD KeyRange attention_key_range(int64_t query, int64_t q_len, int64_t k_len, bool causal, int64_t window,
                                       int64_t k_start = 0) {
  int64_t begin = k_start, end = k_len;
  if (causal) {
    const int64_t pos = k_len - q_len + query;
    end = pos + 1 < k_len ? pos + 1 : k_len;
    if (window > 0 && pos - window + 1 > begin) begin = pos - window + 1;
  }
  if (end < 0) end = 0;
  if (begin < 0) begin = 0;
  if (begin > end) begin = end;
  return {begin, end};
}

// Running statistics of an online softmax: the max seen so far and the sum of
// 2^((x - max) * k) over the elements seen, k = scale * log2(e).
struct SoftmaxStats {
  float max;
  float sum;
};

GPTEXT_HD SoftmaxStats softmax_stats_empty() { return {-INFINITY, 0.0f}; }

// Merges two partial statistics (associative and commutative, so any reduction tree
// works). Rescales the partial sum whose max is smaller; an empty side contributes 0; a NaN
// max (a NaN among the values) is kept, and with it a NaN sum.
GPTEXT_HD SoftmaxStats softmax_stats_merge(SoftmaxStats a, SoftmaxStats b, float k) {
  const float m = (a.max > b.max || a.max != a.max) ? a.max : b.max;
  if (m == -INFINITY) return softmax_stats_empty();
  return {m, a.sum * exp2_approx((a.max - m) * k) + b.sum * exp2_approx((b.max - m) * k)};
}

// exp of one element relative to the row max; 0 when the row has no finite max (every key
// masked or -inf), which is what makes a fully masked row come out as zeros, not NaN.
GPTEXT_HD float softmax_exp(float x, float row_max, float k) {
  return row_max == -INFINITY ? 0.0f : exp2_approx((x - row_max) * k);
}

// 1 / sum, except that an empty row (sum 0) scales by 0; a NaN sum stays NaN.
GPTEXT_HD float softmax_inv_sum(float sum) { return sum == 0.0f ? 0.0f : 1.0f / sum; }

// Row-length thresholds that pick a CUDA variant; the CPU has no variants.
constexpr int64_t kSoftmaxWarpMaxCols = 1024;    // row held in one warp's registers
constexpr int64_t kSoftmaxBlockMaxCols = 16384;  // row held in one block's registers
// Beyond that, a single-pass online softmax computes (max, sum) as it streams the row; on
// sm_90 a cluster of blocks holds rows up to this long in registers instead.
constexpr int64_t kSoftmaxClusterMaxCols = 262144;  // gpt-oss's 201,088-token vocabulary fits

}  // namespace gptext
