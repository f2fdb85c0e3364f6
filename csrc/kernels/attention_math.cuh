// The math of fused attention shared by the CUDA kernels (attention_fwd.cu,
// attention_bwd.cu) and the CPU implementation: which keys a query sees, which key tiles a
// block of queries needs, how to split long key ranges across thread blocks, and the
// shared-memory swizzle of the tensor-core tiles.
#pragma once

#include "args.h"
#include "softmax_math.cuh"

namespace gptext {

// The valid keys of batch b before causality: [start, len).
// Out-of-range values are clamped (to 0 <= start <= len <= k_len), so a bad length can cost
// a wrong answer but never an out-of-bounds read.
GPTEXT_HD KeyRange attention_batch_keys(const AttentionArgs& a, int64_t b) {
  int64_t len = a.kv_lens != nullptr ? a.kv_lens[b] : a.k_len;
  len = len < 0 ? 0 : (len > a.k_len ? a.k_len : len);
  int64_t start = a.kv_starts != nullptr ? a.kv_starts[b] : 0;
  start = start < 0 ? 0 : (start > len ? len : start);
  return {start, len};
}

// Keys query t of batch b may attend to (causality, window, padding, not-yet-written keys).
GPTEXT_HD KeyRange attention_row_keys(const AttentionArgs& a, int64_t b, int64_t t) {
  const KeyRange valid = attention_batch_keys(a, b);
  return attention_key_range(t, a.q_len, valid.end, a.causal, a.window, valid.begin);
}

// Keys that any of queries t_lo..t_hi may attend to: a superset of each one's range (row
// ranges only move right as t grows), possibly empty.
GPTEXT_HD KeyRange attention_span_keys(const AttentionArgs& a, int64_t b, int64_t t_lo, int64_t t_hi) {
  const KeyRange valid = attention_batch_keys(a, b);
  int64_t begin = valid.begin, end = valid.end;
  if (a.causal) {
    const int64_t first_pos = valid.end - a.q_len + t_lo, last_pos = valid.end - a.q_len + t_hi;
    if (a.window > 0 && first_pos - a.window + 1 > begin) begin = first_pos - a.window + 1;
    if (last_pos + 1 < end) end = last_pos + 1;
  }
  end = end < 0 ? 0 : end;
  begin = begin < 0 ? 0 : (begin > end ? end : begin);
  return {begin, end};
}

// Whether keys [k0, k1) are visible to every query between one whose keys are `first` and
// a later one whose keys are `last` (row ranges only move right), so a tile needs no mask.
GPTEXT_HD bool keys_unmasked(KeyRange first, KeyRange last, int64_t k0, int64_t k1) {
  return k0 >= last.begin && k1 <= first.end;
}

// Whether keys [k0, k1) are visible to every query t_lo..t_hi.
GPTEXT_HD bool attention_tile_unmasked(const AttentionArgs& a, int64_t b, int64_t t_lo, int64_t t_hi, int64_t k0,
                                       int64_t k1) {
  return keys_unmasked(attention_row_keys(a, b, t_lo), attention_row_keys(a, b, t_hi), k0, k1);
}

// Queries (of batch b) that may attend to any of keys [k0, k1): a superset, possibly empty;
// for a single key (k1 = k0 + 1), exactly the queries that see it.
GPTEXT_HD KeyRange attention_query_span(const AttentionArgs& a, int64_t b, int64_t k0, int64_t k1) {
  const KeyRange valid = attention_batch_keys(a, b);
  if (k1 <= valid.begin || k0 >= valid.end) return {0, 0};
  int64_t begin = 0, end = a.q_len;
  if (a.causal) {
    const int64_t offset = valid.end - a.q_len;  // query t sits at position offset + t
    if (k0 - offset > begin) begin = k0 - offset;
    if (a.window > 0 && k1 + a.window - 1 - offset < end) end = k1 + a.window - 1 - offset;
  }
  if (end < 0) end = 0;
  if (begin > end) begin = end;
  return {begin, end};
}

// A range of keys (or queries) made relative to a tile of `cols` columns starting at col0:
// column j of the tile lies in the range iff lo <= j < hi. Plain ints, so that the kernels'
// per-element masks are 32-bit compares against constants.
struct ColumnRange {
  int lo;
  int hi;
};
GPTEXT_HD ColumnRange tile_columns(KeyRange r, int64_t col0, int cols) {
  const int64_t lo = r.begin - col0, hi = r.end - col0;
  return {int(lo < 0 ? 0 : (lo > cols ? cols : lo)), int(hi < 0 ? 0 : (hi > cols ? cols : hi))};
}

// log(e^x + e^y), with -inf as the identity.
GPTEXT_HD float log_add_exp(float x, float y) {
  const float m = x > y ? x : y;
  if (m == -INFINITY) return -INFINITY;
  return m + std::log(std::exp(x - m) + std::exp(y - m));
}

// How many thread blocks share one row tile's keys (split-KV, "flash decoding"): enough
// for `target_blocks` blocks when the row tiles alone are fewer, while each split keeps at
// least two key tiles to stream.
GPTEXT_HD int attention_num_splits(int64_t blocks, int64_t key_tiles, int64_t target_blocks, int max_splits) {
  if (blocks >= target_blocks || key_tiles < 4) return 1;
  int64_t splits = ceil_div(target_blocks, blocks);
  if (splits > key_tiles / 2) splits = key_tiles / 2;
  if (splits > max_splits) splits = max_splits;
  return splits < 1 ? 1 : int(splits);
}

// The 16-byte chunk of shared-memory row `row` where logical chunk `chunk` is stored. Rows
// of tensor-core tiles are 128 or 256 bytes, so without the XOR the 8 rows an ldmatrix
// phase reads would all start in the same bank; with it they fall in 8 different 16-byte
// bank groups. A permutation of the chunks of each row (its low three bits are flipped).
GPTEXT_HD int swizzle_chunk(int row, int chunk) { return chunk ^ (row & 7); }

}  // namespace gptext
