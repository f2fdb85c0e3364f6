// Host tests of the kernel math shared by the CUDA kernels and the CPU implementations
// (csrc/kernels/*.cuh). Runs on any machine; the CUDA kernels' own tests are in
// test_kernels.cu.
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "../kernels/activations.cuh"
#include "../kernels/attention_math.cuh"
#include "../kernels/gemm_tiles.cuh"
#include "../kernels/norm_math.cuh"
#include "../kernels/softmax_math.cuh"
#include "check.h"

using namespace gptext;

static void test_conversions() {
  // Exactly representable values survive a round trip; rounding is to nearest-even.
  for (float v : {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.9604644775390625e-08f}) {
    CHECK(f16_bits_to_float(float_to_f16_bits(v)) == v, "fp16 round trip of %g", v);
  }
  for (float v : {0.0f, 1.0f, -3.0f, 1.5f, 3.3895313892515355e38f}) {
    CHECK(bf16_bits_to_float(float_to_bf16_bits(v)) == v, "bf16 round trip of %g", v);
  }
  CHECK(float_to_bf16_bits(1.0f) == 0x3f80, "bf16(1)");
  CHECK(float_to_f16_bits(1.0f) == 0x3c00, "f16(1)");
  CHECK(float_to_f16_bits(1.0f + 1.0f / 2048) == 0x3c00, "f16 tie to even (down)");
  CHECK(float_to_f16_bits(1.0f + 3.0f / 2048) == 0x3c02, "f16 tie to even (up)");
  CHECK(float_to_bf16_bits(1.0f + 1.0f / 256) == 0x3f80, "bf16 tie to even (down)");
  CHECK(float_to_f16_bits(65520.0f) == 0x7c00, "f16 overflow to inf");
  CHECK(float_to_f16_bits(1e-8f) == 0x0000, "f16 underflow to 0");
  CHECK(float_to_f16_bits(3e-8f) == 0x0001, "f16 rounds up to the smallest subnormal");
  CHECK(std::isnan(f16_bits_to_float(float_to_f16_bits(NAN))), "f16 NaN");
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(NAN))), "bf16 NaN");
  CHECK(std::isinf(bf16_bits_to_float(float_to_bf16_bits(INFINITY))), "bf16 inf");
  // Every fp16 value converts to float and back to itself.
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = f16_bits_to_float(uint16_t(bits));
    if (std::isnan(f)) continue;
    CHECK(float_to_f16_bits(f) == bits, "fp16 0x%04x", bits);
  }
}

static void test_exp2() {
  double worst = 0;
  for (float x = -125.0f; x < 127.0f; x += 0.0137f) {
    const double rel = std::fabs(exp2_approx(x) / std::exp2(double(x)) - 1.0);
    worst = rel > worst ? rel : worst;
  }
  CHECK(worst < 2e-7, "exp2_approx relative error %g", worst);
  // Every float in [-1, 1], where softmax's exponentials of near-max scores land.
  worst = 0;
  for (uint32_t bits = 0; bits <= 0x3f800000u; bits += 3) {
    for (float sign : {1.0f, -1.0f}) {
      const float x = sign * bits_to_float(bits);
      const double rel = std::fabs(exp2_approx(x) / std::exp2(double(x)) - 1.0);
      worst = rel > worst ? rel : worst;
    }
  }
  CHECK(worst < 2e-7, "exp2_approx relative error on [-1, 1] %g", worst);
  for (int n = -126; n <= 127; ++n) {  // powers of two are exact
    CHECK(exp2_approx(float(n)) == float(std::ldexp(1.0, n)), "exp2(%d) = %g", n, exp2_approx(float(n)));
  }
  CHECK(exp2_approx(-INFINITY) == 0.0f, "exp2(-inf)");
  CHECK(exp2_approx(-200.0f) == 0.0f && exp2_approx(-127.0f) == 0.0f, "exp2 underflow");
  CHECK(std::isfinite(exp2_approx(200.0f)) && exp2_approx(200.0f) > 1e38f, "exp2 overflow clamps to 2^127");
  CHECK(std::isnan(exp2_approx(NAN)), "exp2(NaN)");
  CHECK(exp2_approx(0.0f) == 1.0f, "exp2(0) = %g", exp2_approx(0.0f));
}

static void test_gelu() {
  for (double x = -12; x < 12; x += 0.01) {
    const double exact = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    CHECK(std::fabs(gelu_tanh(float(x)) - exact) < 1e-6 + 1e-6 * std::fabs(exact), "gelu(%g)", x);
  }
  // Far below 0 GELU is 0 to float precision; -inf and NaN give NaN, +inf itself (as PyTorch).
  for (float x : {-10.5f, -100.0f, -1e30f, -3e38f}) CHECK(gelu_tanh(x) == 0.0f, "gelu(%g) = %g", x, gelu_tanh(x));
  CHECK(std::isnan(gelu_tanh(-INFINITY)) && std::isnan(gelu_tanh(NAN)), "gelu(-inf), gelu(NaN)");
  CHECK(gelu_tanh(INFINITY) == INFINITY && gelu_tanh(3e38f) == 3e38f, "gelu(+large)");
  CHECK(linear_epilogue(1.0f, 2.0f, Activation::Relu, 0.5f) == 3.5f, "relu epilogue");
  CHECK(linear_epilogue(-4.0f, 1.0f, Activation::Relu, 0.5f) == 0.5f, "relu epilogue (negative)");
  CHECK(linear_epilogue(1.0f, 2.0f, Activation::None, -3.0f) == 0.0f, "plain epilogue");
}

static void test_key_range() {
  // q_len 3, k_len 5: queries at positions 2, 3, 4.
  KeyRange r = attention_key_range(0, 3, 5, true, 0);
  CHECK(r.begin == 0 && r.end == 3, "causal first query");
  r = attention_key_range(2, 3, 5, true, 2);
  CHECK(r.begin == 3 && r.end == 5, "window 2 at position 4: [%lld, %lld)", (long long)r.begin, (long long)r.end);
  r = attention_key_range(0, 4, 2, true, 0);  // query before the first key
  CHECK(r.begin == r.end, "empty range");
  r = attention_key_range(1, 2, 7, false, 0);
  CHECK(r.begin == 0 && r.end == 7, "not causal");
}

// What the attention kernels' masks rely on: attention_query_span of one key is exactly the
// set of queries whose attention_row_keys hold it, and tile_columns maps a range onto a
// tile's columns.
static void test_attention_masks() {
  for (int64_t q_len : {1, 3, 7}) {
    for (int64_t k_len : {1, 5, 9}) {
      for (int causal = 0; causal < 2; ++causal) {
        for (int64_t window : {0, 1, 3}) {
          for (int32_t start : {0, 2}) {
            for (int32_t len : {int32_t(k_len), int32_t(k_len - 1), 0}) {
              AttentionArgs a{};
              a.batch = 1, a.heads = 1, a.kv_heads = 1, a.q_len = q_len, a.k_len = k_len, a.head_dim = 64;
              a.causal = causal != 0, a.window = window;
              a.kv_starts = &start, a.kv_lens = &len;
              for (int64_t key = 0; key < k_len; ++key) {
                const KeyRange seen = attention_query_span(a, 0, key, key + 1);
                for (int64_t t = 0; t < q_len; ++t) {
                  const KeyRange r = attention_row_keys(a, 0, t);
                  const bool sees = key >= r.begin && key < r.end, listed = t >= seen.begin && t < seen.end;
                  CHECK(sees == listed, "query %lld, key %lld (q_len %lld, k_len %lld, causal %d, window %lld, "
                        "keys [%lld, %lld))", (long long)t, (long long)key, (long long)q_len, (long long)k_len,
                        causal, (long long)window, (long long)start, (long long)len);
                }
              }
            }
          }
        }
      }
    }
  }
  for (int64_t begin : {-5, 0, 3, 40, 64, 70, 200}) {
    for (int64_t end : {-1, 0, 3, 63, 64, 90, 300}) {
      for (int64_t col0 : {0, 64, 128}) {
        const ColumnRange c = tile_columns({begin, end}, col0, 64);
        for (int j = 0; j < 64; ++j) {
          const bool inside = col0 + j >= begin && col0 + j < end;
          CHECK(inside == (j >= c.lo && j < c.hi), "tile_columns [%lld, %lld) from %lld, column %d", (long long)begin,
                (long long)end, (long long)col0, j);
        }
      }
    }
  }
}

static void test_softmax_stats() {
  std::mt19937 gen(1);
  std::normal_distribution<float> dist(0, 5);
  std::vector<float> x(1000);
  for (float& v : x) v = dist(gen);
  const float k = 0.7f * kLog2e;
  double m = -INFINITY, s = 0;
  for (float v : x) m = std::max<double>(m, v);
  for (float v : x) s += std::exp2((v - m) * double(k));
  // Merge singletons in two different orders: same (max, sum).
  SoftmaxStats forward = softmax_stats_empty(), backward = softmax_stats_empty();
  for (size_t i = 0; i < x.size(); ++i) {
    forward = softmax_stats_merge(forward, {x[i], 1.0f}, k);
    backward = softmax_stats_merge({x[x.size() - 1 - i], 1.0f}, backward, k);
  }
  CHECK(forward.max == float(m) && backward.max == float(m), "max");
  CHECK(std::fabs(forward.sum / s - 1) < 1e-5 && std::fabs(backward.sum / s - 1) < 1e-5, "sum %g %g vs %g",
        forward.sum, backward.sum, s);
  const SoftmaxStats empty = softmax_stats_merge(softmax_stats_empty(), softmax_stats_empty(), k);
  CHECK(empty.max == -INFINITY && empty.sum == 0.0f, "empty merge");
  CHECK(softmax_exp(3.0f, -INFINITY, k) == 0.0f && softmax_inv_sum(0.0f) == 0.0f, "fully masked row");
  // A NaN survives a merge in either order, also with an empty side.
  const SoftmaxStats nan = {NAN, NAN};
  for (const SoftmaxStats& other : {softmax_stats_empty(), SoftmaxStats{2.0f, 1.0f}}) {
    const SoftmaxStats ab = softmax_stats_merge(nan, other, k), ba = softmax_stats_merge(other, nan, k);
    CHECK(std::isnan(ab.sum) && std::isnan(ba.sum), "NaN merge");
  }
}

static void test_welford() {
  std::mt19937 gen(2);
  std::normal_distribution<float> dist(100, 3);
  std::vector<float> x(4097);
  for (float& v : x) v = dist(gen);
  double mean = 0, m2 = 0;
  for (float v : x) mean += v;
  mean /= x.size();
  for (float v : x) m2 += (v - mean) * (v - mean);
  // Four partial states merged in a tree, as the block reduction does.
  WelfordState parts[4] = {welford_empty(), welford_empty(), welford_empty(), welford_empty()};
  for (size_t i = 0; i < x.size(); ++i) parts[i % 4] = welford_push(parts[i % 4], x[i]);
  const WelfordState all = welford_merge(welford_merge(parts[0], parts[1]), welford_merge(parts[2], parts[3]));
  CHECK(all.count == float(x.size()), "count");
  CHECK(std::fabs(all.mean - mean) < 1e-4, "mean %g vs %g", all.mean, mean);
  CHECK(std::fabs(all.m2 / m2 - 1) < 1e-4, "m2 %g vs %g", all.m2, m2);
  CHECK(welford_merge(welford_empty(), welford_empty()).count == 0, "empty merge");
  CHECK(std::fabs(layernorm_apply(3.0f, 1.0f, 0.5f, 2.0f, 0.25f) - 2.25f) < 1e-7f, "layernorm_apply");
}

static void test_gemm_tiles() {
  for (int64_t tiles_m : {1, 3, 8, 9, 17}) {
    for (int64_t tiles_n : {1, 2, 5, 13}) {
      for (int64_t group : {1, 4, 8}) {
        std::set<std::pair<int64_t, int64_t>> seen;
        for (int64_t b = 0; b < tiles_m * tiles_n; ++b) {
          const TileCoord t = gemm_tile_of_block(b, tiles_m, tiles_n, group);
          CHECK(t.m >= 0 && t.m < tiles_m && t.n >= 0 && t.n < tiles_n, "tile in range");
          seen.insert({t.m, t.n});
        }
        CHECK(int64_t(seen.size()) == tiles_m * tiles_n, "bijection %lld x %lld group %lld", (long long)tiles_m,
              (long long)tiles_n, (long long)group);
      }
    }
  }
  CHECK(gemm_chunk_bytes(true, 0, 100, 2) == 16, "full chunk");
  CHECK(gemm_chunk_bytes(true, 96, 100, 2) == 8, "tail chunk");
  CHECK(gemm_chunk_bytes(true, 104, 100, 2) == 0, "past the end");
  CHECK(gemm_chunk_bytes(false, 0, 100, 2) == 0, "row outside");
  // Block tiles: counts with partial edge tiles; the unmeasured choice needs a Large tile per SM.
  CHECK(gemm_tile_count(GemmTile::Small, 65, 64) == 2, "small tiles");
  CHECK(gemm_tile_count(GemmTile::Large, 4096, 4096) == 1024, "large tiles");
  CHECK(gemm_tile_count(GemmTile::Wide, 8192, 768) == 64 * 3, "wide tiles");
  CHECK(gemm_tile_count(GemmTile::Wide, 1, 257) == 2, "wide tiles, edges");
  CHECK(gemm_default_tile(8192, 2304, 132) == GemmTile::Large, "prefill takes the large tile");
  CHECK(gemm_default_tile(1, 2304, 132) == GemmTile::Small, "decode takes the small tile");
  CHECK(gemm_default_tile(128 * 11, 128 * 12, 132) == GemmTile::Large, "exactly one large tile per SM");
  CHECK(gemm_default_tile(128 * 11, 128 * 12 - 1, 133) == GemmTile::Small, "one large tile short");
}

// The grouped GEMM's tiles: every row of every bucket in exactly one tile, in bucket order,
// and never more tiles than grouped_tiles_bound().
static void test_grouped_tiles() {
  const std::vector<std::vector<int64_t>> cases = {{0}, {5}, {0, 0, 0}, {64, 1, 0, 65, 128}, {3, 0, 200, 7}};
  for (const auto& counts : cases) {
    for (int64_t rows : {16, 64, 128}) {
      std::vector<int64_t> offsets(1, 0);
      for (int64_t c : counts) offsets.push_back(offsets.back() + c);
      const int64_t buckets = int64_t(counts.size()), routes = offsets.back();
      std::vector<int64_t> covered(static_cast<size_t>(routes), 0);
      int64_t t = 0, last_bucket = 0;
      for (;; ++t) {
        const GroupTile g = grouped_tile(offsets.data(), buckets, rows, t);
        if (g.bucket == buckets) break;
        CHECK(g.bucket >= last_bucket && g.count == counts[g.bucket] && g.begin == offsets[g.bucket], "bucket order");
        CHECK(g.row0 % rows == 0 && g.row0 < g.count, "tile start inside its bucket");
        for (int64_t r = g.row0; r < g.row0 + rows && r < g.count; ++r) ++covered[g.begin + r];
        last_bucket = g.bucket;
      }
      CHECK(t <= grouped_tiles_bound(routes, buckets, rows), "tiles within the bound (%lld)", (long long)t);
      for (int64_t c : covered) CHECK(c == 1, "every route in one tile");
    }
  }
}

int main() {
  test_conversions();
  test_exp2();
  test_gelu();
  test_key_range();
  test_attention_masks();
  test_softmax_stats();
  test_welford();
  test_gemm_tiles();
  test_grouped_tiles();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kernel math: all checks passed\n");
  return 0;
}
