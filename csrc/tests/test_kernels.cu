// Native tests of the CUDA kernels against the CPU implementations (csrc/cpu), with no torch:
// random inputs in every storage type, sizes that reach each kernel variant and its tails,
// misaligned pointers. Exits 77 ("skipped" for CTest) when there is no usable GPU, 1 on any
// mismatch. bench/gpu_suite.sh runs it plain, under compute-sanitizer, and with --bench (the
// WMMA GEMM's block tiles, and the attention forward's two row forms, timed against each
// other).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../cpu/cpu_kernels.h"
#include "../kernels/launch.h"
#include "../kernels/softmax_math.cuh"

using namespace gptext;

static int failures = 0;
static int cases = 0;
// --small (for compute-sanitizer, which slows kernels down a hundredfold): only the cases
// whose inputs have at most this many elements.
static int64_t max_elements = INT64_MAX;

#define CUDA_OK(expr)                                                                          \
  do {                                                                                         \
    const cudaError_t err_ = (expr);                                                           \
    if (err_ != cudaSuccess) {                                                                 \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, __LINE__, #expr); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

// Host values in a storage type: fp32, or raw bf16/fp16 bits (what csrc/cpu takes).
struct HostArray {
  DType dtype;
  std::vector<uint8_t> bytes;
  HostArray(DType t, size_t n) : dtype(t), bytes(n * dtype_size(t)) {}
  size_t size() const { return bytes.size() / dtype_size(dtype); }
  void* data() { return bytes.data(); }
  float get(size_t i) const {
    if (dtype == DType::F32) {
      float v;
      std::memcpy(&v, &bytes[4 * i], 4);
      return v;
    }
    uint16_t h;
    std::memcpy(&h, &bytes[2 * i], 2);
    return dtype == DType::BF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
  }
  void set(size_t i, float v) {
    if (dtype == DType::F32) {
      std::memcpy(&bytes[4 * i], &v, 4);
      return;
    }
    const uint16_t h = dtype == DType::BF16 ? float_to_bf16_bits(v) : float_to_f16_bits(v);
    std::memcpy(&bytes[2 * i], &h, 2);
  }
};

static HostArray random_array(DType t, size_t n, std::mt19937& gen, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  HostArray a(t, n);
  for (size_t i = 0; i < n; ++i) a.set(i, dist(gen));
  return a;
}

// A device copy, `offset` elements into its allocation (offset 1 breaks 16-byte alignment).
struct DeviceArray {
  void* base = nullptr;
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceArray(const HostArray& h, int offset = 0) {
    const size_t elem = dtype_size(h.dtype);
    bytes = h.bytes.size();
    CUDA_OK(cudaMalloc(&base, bytes + offset * elem + 16));
    ptr = static_cast<uint8_t*>(base) + offset * elem;
    if (bytes) CUDA_OK(cudaMemcpy(ptr, h.bytes.data(), bytes, cudaMemcpyHostToDevice));
  }
  DeviceArray(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(base); }
  HostArray download(DType t) const {
    HostArray h(t, bytes / dtype_size(t));
    if (bytes) CUDA_OK(cudaMemcpy(h.data(), ptr, bytes, cudaMemcpyDeviceToHost));
    return h;
  }
};

// Tolerances by storage type: a couple of units in the last place of the output.
static float rtol(DType t) { return t == DType::F32 ? 2e-5f : (t == DType::F16 ? 4e-3f : 3e-2f); }

static void compare(const std::string& name, const HostArray& got, const HostArray& want, float atol, float rel) {
  ++cases;
  size_t bad = 0, first = 0;
  float worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const float g = got.get(i), w = want.get(i);
    const float err = std::fabs(g - w);
    const bool both_nan = std::isnan(g) && std::isnan(w);
    if (!both_nan && !(err <= atol + rel * std::fabs(w))) {
      if (bad++ == 0) first = i;
      worst = err > worst ? err : worst;
    }
  }
  if (bad) {
    ++failures;
    std::printf("FAIL %s: %zu of %zu differ (first at %zu: %g vs %g; worst error %g)\n", name.c_str(), bad,
                want.size(), first, got.get(first), want.get(first), worst);
  }
}

static const char* name_of(DType t) { return t == DType::F32 ? "f32" : (t == DType::F16 ? "f16" : "bf16"); }

static void test_softmax(std::mt19937& gen) {
  struct Case {
    int64_t rows, cols;
    bool causal;
    int64_t window, q_len;
  };
  const Case cases_[] = {{7, 1, false, 0, 1},      {5, 37, false, 0, 1},    {33, 1024, false, 0, 1},
                         {3, 1025, false, 0, 1},   {2, 16384, false, 0, 1}, {2, 16385, false, 0, 1},
                         {2, 50257, false, 0, 1},  {12, 40, true, 0, 4},    {12, 40, true, 7, 6},
                         {4, 3000, true, 128, 2},  {6, 20000, true, 0, 3},  {8, 5, true, 0, 8},
                         {3, 65537, false, 0, 1},  {1, 201088, false, 0, 1}, {2, 262144, true, 0, 2},
                         {2, 262145, false, 0, 1}};
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    for (const Case& c : cases_) {
      if (c.rows * c.cols > max_elements) continue;
      for (int offset : {0, 1}) {
        HostArray x = random_array(t, c.rows * c.cols, gen, 3.0f);
        if (c.causal) {
          // A NaN that row 0 sees makes its visible keys NaN and leaves its masked keys 0; a
          // +inf that row 1 does not see changes nothing.
          x.set(attention_key_range(0, c.q_len, c.cols, true, c.window).begin, NAN);
          const KeyRange seen = attention_key_range(1 % c.q_len, c.q_len, c.cols, true, c.window);
          if (c.rows > 1 && seen.end < c.cols) x.set(c.cols + seen.end, INFINITY);
        }
        HostArray want(t, x.size());
        SoftmaxArgs args{x.bytes.data(), want.data(), c.rows, c.cols, 0.3f, c.causal, c.window, c.q_len};
        cpu::softmax_rows(t, args, 0, c.rows);
        DeviceArray dx(x, offset), dy(want, offset);
        args.x = dx.ptr;
        args.y = dy.ptr;
        CUDA_OK(kernels::softmax_forward(args, t, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        compare("softmax " + std::string(name_of(t)) + " " + std::to_string(c.rows) + "x" + std::to_string(c.cols) +
                    (c.causal ? " causal" : "") + (offset ? " misaligned" : ""),
                dy.download(t), want, 1e-6f, rtol(t));
      }
    }
  }
}

// Cross-entropy forward (loss, lse) and backward (dx) against the CPU kernels, one row's
// target ignored and, from 3 rows, one out of range (NaN loss, zero gradient). NaN logits
// make their row's lse (and loss, and gradient) NaN wherever they sit: in the last row's
// last column (a scalar tail, the one the vector loop does not cover), in the middle of
// row 3, and in the whole of row 4.
static void test_cross_entropy(std::mt19937& gen) {
  struct Case {
    int64_t rows, cols;
  };
  const Case cases_[] = {{3, 1}, {5, 37}, {33, 1024}, {4, 16385}, {2, 50257}, {1, 201088}};
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    for (const Case& c : cases_) {
      if (c.rows * c.cols > max_elements) continue;
      for (int offset : {0, 1}) {
        HostArray x = random_array(t, c.rows * c.cols, gen, 3.0f);
        if (c.rows > 1) x.set(c.rows * c.cols - 1, NAN);
        if (c.rows > 3) x.set(3 * c.cols + c.cols / 2, NAN);
        if (c.rows > 4)
          for (int64_t i = 0; i < c.cols; ++i) x.set(4 * c.cols + i, NAN);
        std::vector<int64_t> targets(c.rows);
        std::uniform_int_distribution<int64_t> pick(0, c.cols - 1);
        for (auto& v : targets) v = pick(gen);
        if (c.rows > 1) targets[1] = -1;      // ignored
        if (c.rows > 2) targets[2] = c.cols;  // out of range
        const HostArray grad = random_array(DType::F32, c.rows, gen);
        HostArray loss(DType::F32, c.rows), lse(DType::F32, c.rows), dx(t, x.size());
        CrossEntropyArgs args{x.bytes.data(), targets.data(), static_cast<float*>(loss.data()),
                              static_cast<float*>(lse.data()), reinterpret_cast<const float*>(grad.bytes.data()), dx.data(),
                              c.rows, c.cols, -1};
        cpu::cross_entropy_rows(t, args, 0, c.rows);
        cpu::cross_entropy_backward_rows(t, args, 0, c.rows);
        // The device outputs start as junk, so that a value the kernels never write shows.
        HostArray junk(DType::F32, c.rows), junk_dx(t, x.size());
        for (size_t i = 0; i < junk.size(); ++i) junk.set(i, 777.0f);
        for (size_t i = 0; i < junk_dx.size(); ++i) junk_dx.set(i, 777.0f);
        DeviceArray d_x(x, offset), d_loss(junk), d_lse(junk), d_grad(grad), d_dx(junk_dx, offset);
        void* d_targets = nullptr;
        CUDA_OK(cudaMalloc(&d_targets, c.rows * sizeof(int64_t)));
        CUDA_OK(cudaMemcpy(d_targets, targets.data(), c.rows * sizeof(int64_t), cudaMemcpyHostToDevice));
        CrossEntropyArgs dev_args{d_x.ptr, static_cast<const int64_t*>(d_targets), static_cast<float*>(d_loss.ptr),
                                  static_cast<float*>(d_lse.ptr), static_cast<const float*>(d_grad.ptr), d_dx.ptr,
                                  c.rows, c.cols, -1};
        CUDA_OK(kernels::cross_entropy_forward(dev_args, t, nullptr));
        CUDA_OK(kernels::cross_entropy_backward(dev_args, t, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        CUDA_OK(cudaFree(d_targets));
        const std::string name = std::string(name_of(t)) + " " + std::to_string(c.rows) + "x" + std::to_string(c.cols) +
                                 (offset ? " misaligned" : "");
        compare("cross_entropy loss " + name, d_loss.download(DType::F32), loss, 1e-5f, 2e-5f);
        compare("cross_entropy lse " + name, d_lse.download(DType::F32), lse, 1e-5f, 2e-5f);
        // Each side's gradient comes from its own log-sum-exp: their difference scales it.
        compare("cross_entropy dx " + name, d_dx.download(t), dx, 1e-7f, std::max(rtol(t), 1e-4f));
      }
    }
  }
}

static void test_layernorm(std::mt19937& gen) {
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    for (int64_t cols : {1, 37, 768, 1024, 1600, 2880, 16384, 20000}) {
      for (bool residual : {true, false}) {
        for (int variant = 0; variant < 4; ++variant) {  // aligned or not, LayerNorm or RMSNorm
          const int offset = variant % 2;
          const bool rms = variant >= 2;
          const int64_t rows = cols > 4096 ? 3 : 9;
          if (rows * cols > max_elements) continue;
          const HostArray x = random_array(t, rows * cols, gen, 2.0f), r = random_array(t, rows * cols, gen);
          const HostArray w = random_array(t, cols, gen), b = random_array(t, cols, gen, 0.1f);
          HostArray out(t, rows * cols), sum(t, rows * cols);
          std::vector<float> mean(rows), rstd(rows);
          NormArgs args{x.bytes.data(), residual ? r.bytes.data() : nullptr, w.bytes.data(),
                        rms ? nullptr : b.bytes.data(), out.data(), residual ? sum.data() : nullptr, mean.data(),
                        rstd.data(), rows, cols, 1e-5f, rms};
          cpu::layernorm_rows(t, args, 0, rows);
          DeviceArray dx(x, offset), dr(r, offset), dw(w), db(b), dout(out, offset), dsum(sum, offset);
          HostArray stats(DType::F32, 2 * rows);
          DeviceArray dstats(stats);
          args.x = dx.ptr;
          args.residual = residual ? dr.ptr : nullptr;
          args.weight = dw.ptr;
          args.bias = rms ? nullptr : db.ptr;
          args.out = dout.ptr;
          args.sum = residual ? dsum.ptr : nullptr;
          args.mean = static_cast<float*>(dstats.ptr);
          args.rstd = static_cast<float*>(dstats.ptr) + rows;
          CUDA_OK(kernels::layernorm_forward(args, t, nullptr));
          CUDA_OK(cudaDeviceSynchronize());
          const std::string name = (rms ? "rmsnorm " : "layernorm ") + std::string(name_of(t)) + " " + std::to_string(cols) +
                                   (residual ? " residual" : "") + (offset ? " misaligned" : "");
          compare(name, dout.download(t), out, 1e-5f, 2 * rtol(t));
          if (residual) compare(name + " (sum)", dsum.download(t), sum, 0.0f, 0.0f);
          HostArray want_stats(DType::F32, 2 * rows);
          for (int64_t i = 0; i < rows; ++i) {
            want_stats.set(i, mean[i]);
            want_stats.set(rows + i, rstd[i]);
          }
          compare(name + " (stats)", dstats.download(DType::F32), want_stats, 1e-5f, 1e-4f);
        }
      }
    }
  }
}

// fp64 product on the host, then the shared epilogue, rounded to the storage type.
static HostArray gemm_reference(const HostArray& a, const HostArray& b, const HostArray* bias, const HostArray* res,
                                int64_t m, int64_t n, int64_t k, Activation act) {
  HostArray c(a.dtype, m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += double(a.get(i * k + p)) * b.get(j * k + p);
      c.set(i * n + j, linear_epilogue(float(acc), bias ? bias->get(j) : 0.0f, act, res ? res->get(i * n + j) : 0.0f));
    }
  return c;
}

static void test_gemm(std::mt19937& gen) {
  struct Case {
    int64_t m, n, k;
  };
  const Case shapes[] = {{1, 1, 1}, {1, 64, 768}, {7, 13, 29}, {33, 65, 17}, {130, 257, 96}, {64, 64, 0},
                         {256, 2304, 64}, {2048, 1024, 72}};
  for (DType t : {DType::BF16, DType::F16}) {
    for (const Case& s : shapes) {
      if (s.m * s.n + (s.m + s.n) * s.k > max_elements) continue;
      for (Activation act : {Activation::None, Activation::Gelu}) {
        for (bool extras : {false, true}) {
          const HostArray a = random_array(t, s.m * s.k, gen), b = random_array(t, s.n * s.k, gen, 0.2f);
          const HostArray bias = random_array(t, s.n, gen), res = random_array(t, s.m * s.n, gen);
          const HostArray want = gemm_reference(a, b, extras ? &bias : nullptr, extras ? &res : nullptr, s.m, s.n,
                                                s.k, act);
          const std::string name = "gemm " + std::string(name_of(t)) + " " + std::to_string(s.m) + "x" +
                                   std::to_string(s.n) + "x" + std::to_string(s.k) +
                                   (act == Activation::Gelu ? " gelu" : "") + (extras ? " bias+residual" : "");
          // With bias and residual, also from misaligned x, residual and output pointers: plain
          // loads instead of cp.async (even where K is a multiple of 8), scalar stores.
          for (int offset : {0, 1}) {
            if (offset && !extras) continue;
            DeviceArray da(a, offset), db(b), dbias(bias), dres(res, offset), dc(HostArray(t, s.m * s.n), offset);
            const GemmArgs args{da.ptr, db.ptr, dc.ptr, extras ? dbias.ptr : nullptr, extras ? dres.ptr : nullptr,
                                s.m, s.n, s.k, s.k, s.k, s.n, act};
            for (int tile = 0; tile < kGemmTiles; ++tile) {
              CUDA_OK(cudaMemset(dc.ptr, 0xff, dc.bytes));  // NaN patterns: an unwritten output fails
              CUDA_OK(kernels::gemm_wmma(args, t, GemmTile(tile), nullptr));
              CUDA_OK(cudaDeviceSynchronize());
              const GemmTileShape shape = gemm_tile_shape(GemmTile(tile));
              compare(name + " (tile " + std::to_string(shape.rows) + "x" + std::to_string(shape.cols) + ")" +
                          (offset ? " misaligned" : ""),
                      dc.download(t), want, 1e-2f, 2 * rtol(t));
            }
          }

          // The epilogue kernel over a product computed on the host and stored in T (the
          // cuBLAS path). Its oracle starts from that stored product: the rounding to T before
          // the epilogue is the path's own, and can differ from `want` by an ulp of the product
          // where the residual cancels most of it.
          const HostArray product = gemm_reference(a, b, nullptr, nullptr, s.m, s.n, s.k, Activation::None);
          HostArray want_epilogue(t, product.size());
          for (int64_t i = 0; i < s.m; ++i)
            for (int64_t j = 0; j < s.n; ++j)
              want_epilogue.set(i * s.n + j, linear_epilogue(product.get(i * s.n + j), extras ? bias.get(j) : 0.0f, act,
                                                             extras ? res.get(i * s.n + j) : 0.0f));
          DeviceArray dp(product), dbias(bias), dres(res);
          const GemmArgs args{nullptr, nullptr, dp.ptr, extras ? dbias.ptr : nullptr, extras ? dres.ptr : nullptr,
                              s.m, s.n, s.k, s.k, s.k, s.n, act};
          CUDA_OK(kernels::gemm_epilogue(args, t, nullptr));
          CUDA_OK(cudaDeviceSynchronize());
          compare(name + " (epilogue kernel)", dp.download(t), want_epilogue, 1e-2f, 2 * rtol(t));
        }
      }
    }
  }
}

// RoPE (rope.cu) against the CPU kernels: every dtype, head sizes with and without the
// vector width in each half, contiguous rows and a head-split view (positions strided by
// heads x head_dim), and a misaligned x for the scalar path.
static void test_rope(std::mt19937& gen) {
  struct Case {
    int64_t batch, heads, positions, dim;
  };
  const Case shapes[] = {{1, 64, 33, 64}, {2, 3, 5, 6}, {1, 2, 7, 128}, {3, 1, 1, 2}, {2, 4, 9, 80}};
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    for (const Case& s : shapes) {
      const int64_t rows = s.batch * s.heads * s.positions, half = s.dim / 2;
      for (int variant = 0; variant < 3; ++variant) {  // contiguous, head-split view, misaligned
        const HostArray x = random_array(t, rows * s.dim, gen), angles = random_array(DType::F32, 2 * s.batch * s.positions * half, gen, 3.0f);
        HostArray cos(DType::F32, s.batch * s.positions * half), sin(DType::F32, cos.size());
        for (size_t i = 0; i < cos.size(); ++i) {
          cos.set(i, std::cos(angles.get(i)));
          sin.set(i, std::sin(angles.get(i)));
        }
        RopeArgs args{x.bytes.data(), static_cast<const float*>(static_cast<const void*>(cos.bytes.data())),
                      static_cast<const float*>(static_cast<const void*>(sin.bytes.data())), nullptr,
                      s.batch, s.heads, s.positions, s.dim, {s.heads * s.positions * s.dim, s.positions * s.dim, s.dim}};
        if (variant == 1) {  // x as (batch, positions, heads, dim) memory viewed head-split
          args.x_stride[1] = s.dim;
          args.x_stride[2] = s.heads * s.dim;
        }
        HostArray want(t, rows * s.dim);
        args.out = want.data();
        cpu::rope_rows(t, args, 0, rows);
        DeviceArray dx(x, variant == 2 ? 1 : 0), dcos(cos), dsin(sin), dout(HostArray(t, rows * s.dim));
        args.x = dx.ptr;
        args.cos = static_cast<const float*>(dcos.ptr);
        args.sin = static_cast<const float*>(dsin.ptr);
        args.out = dout.ptr;
        CUDA_OK(cudaMemset(dout.ptr, 0xff, dout.bytes));
        CUDA_OK(kernels::rope_forward(args, t, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        compare("rope " + std::string(name_of(t)) + " " + std::to_string(s.batch) + "x" + std::to_string(s.heads) +
                    "x" + std::to_string(s.positions) + "x" + std::to_string(s.dim) +
                    (variant == 1 ? " head-split" : variant == 2 ? " misaligned" : ""),
                dout.download(t), want, 1e-5f, rtol(t));
      }
    }
  }
}

// The expert linear layers (experts.cu) against an fp64 host loop over the routes: every
// dtype, x shared by a token's slots or one row per route, SwiGLU or not, K with and
// without the vector width (and misaligned x for the scalar path), N with a tail, and an
// out-of-range expert index, whose row must come out NaN. bf16/fp16 also take the grouped
// form (expert_linear_grouped, the routes sorted by expert here on the host), including
// shapes with more routes to an expert than a GEMM tile has rows.
static void test_expert_linear(std::mt19937& gen, bool tensor_cores) {
  struct Case {
    int64_t tokens, slots, experts, n, k;
  };
  // {200, 2, 3, ...}: 400 routes, enough for the grouped form's 128-row (Large) tiles.
  const Case shapes[] = {{1, 4, 8, 5760 / 16, 2880}, {3, 2, 5, 38, 64}, {2, 3, 4, 7, 13}, {4, 1, 3, 64, 0},
                         {1, 2, 2, 2, 1}, {90, 4, 3, 130, 72}, {50, 2, 6, 66, 45}, {200, 2, 3, 130, 72}};
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    for (const Case& s : shapes) {
      const int64_t routes = s.tokens * s.slots;
      if ((s.experts * s.n + routes) * s.k > max_elements) continue;
      for (int variant = 0; variant < 4; ++variant) {
        const bool per_route = variant & 1, swiglu = (variant & 2) && s.n % 2 == 0;
        const HostArray x = random_array(t, (per_route ? routes : s.tokens) * s.k, gen);
        const HostArray w = random_array(t, s.experts * s.n * s.k, gen, 0.5f), bias = random_array(t, s.experts * s.n, gen);
        std::vector<int64_t> chosen(routes);
        for (int64_t r = 0; r < routes; ++r) chosen[r] = int64_t(gen() % uint32_t(s.experts));
        chosen[routes - 1] = s.experts;  // out of range: a NaN row
        const int64_t cols = swiglu ? s.n / 2 : s.n;
        HostArray want(t, routes * cols);
        for (int64_t r = 0; r < routes; ++r) {
          const int64_t e = chosen[r], row = per_route ? r : r / s.slots;
          std::vector<float> h(s.n);
          for (int64_t j = 0; j < s.n; ++j) {
            double acc = 0;
            if (e < s.experts)
              for (int64_t p = 0; p < s.k; ++p) acc += double(x.get(row * s.k + p)) * w.get((e * s.n + j) * s.k + p);
            HostArray rounded(t, 1);
            rounded.set(0, e < s.experts ? float(acc) + bias.get(e * s.n + j) : NAN);
            h[j] = rounded.get(0);
          }
          for (int64_t j = 0; j < cols; ++j)
            want.set(r * cols + j, swiglu ? swiglu_clamped(h[2 * j], h[2 * j + 1], 1.5f) : h[j]);
        }
        const int misalign = variant == 1 ? 1 : 0;
        DeviceArray dx(x, misalign), dw(w), dbias(bias), dout(HostArray(t, routes * cols));
        int64_t* dchosen = nullptr;
        CUDA_OK(cudaMalloc(&dchosen, routes * sizeof(int64_t)));
        CUDA_OK(cudaMemcpy(dchosen, chosen.data(), routes * sizeof(int64_t), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemset(dout.ptr, 0, dout.bytes));  // zeros: an unwritten NaN row fails
        const ExpertArgs args{dx.ptr, dw.ptr, dbias.ptr, dchosen, dout.ptr, s.tokens, s.slots, s.experts, s.n, s.k,
                              per_route, swiglu, 1.5f};
        const std::string name = std::string(name_of(t)) + " " + std::to_string(s.tokens) + "x" +
                                 std::to_string(s.slots) + " of " + std::to_string(s.experts) + " " +
                                 std::to_string(s.n) + "x" + std::to_string(s.k) + (per_route ? " per-route x" : "") +
                                 (misalign ? " misaligned" : "") + (swiglu ? " swiglu" : "");
        CUDA_OK(kernels::expert_linear_forward(args, t, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        compare("expert_linear " + name, dout.download(t), want, 1e-2f, 2 * rtol(t));
        if (t != DType::F32 && tensor_cores) {
          // Bucket e: expert e's routes in route order; bucket `experts`: the out-of-range ones.
          std::vector<int64_t> offsets(s.experts + 2, 0), order;
          for (int64_t b = 0; b <= s.experts; ++b) {
            for (int64_t r = 0; r < routes; ++r)
              if (std::min(chosen[r], s.experts) == b) order.push_back(r);
            offsets[b + 1] = int64_t(order.size());
          }
          int64_t *dorder = nullptr, *doffsets = nullptr;
          CUDA_OK(cudaMalloc(&dorder, routes * sizeof(int64_t)));
          CUDA_OK(cudaMalloc(&doffsets, offsets.size() * sizeof(int64_t)));
          CUDA_OK(cudaMemcpy(dorder, order.data(), routes * sizeof(int64_t), cudaMemcpyHostToDevice));
          CUDA_OK(cudaMemcpy(doffsets, offsets.data(), offsets.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
          CUDA_OK(cudaMemset(dout.ptr, 0, dout.bytes));
          CUDA_OK(kernels::expert_linear_grouped(args, dorder, doffsets, t, nullptr));
          CUDA_OK(cudaDeviceSynchronize());
          compare("expert_linear grouped " + name, dout.download(t), want, 1e-2f, 2 * rtol(t));
          cudaFree(dorder);
          cudaFree(doffsets);
        }
        cudaFree(dchosen);
      }
    }
  }
}

static void test_attention(std::mt19937& gen, const cudaDeviceProp& prop) {
  struct Case {
    int64_t batch, heads, kv_heads, q_len, k_len, dim;
    bool causal;
    int64_t window;
    bool sinks, ranges;
  };
  const Case shapes[] = {{2, 4, 4, 37, 37, 64, true, 0, false, false},   {1, 8, 2, 64, 64, 128, true, 16, true, false},
                         {2, 8, 1, 1, 3000, 64, true, 0, true, false},   {1, 64, 8, 1, 8192, 64, true, 128, true, false},
                         {1, 4, 1, 17, 130, 128, false, 0, false, false}, {3, 4, 2, 2, 90, 64, true, 0, false, true},
                         {1, 2, 2, 150, 150, 128, true, 0, true, false},
                         {1, 4, 2, 300, 300, 64, true, 0, false, false}, {2, 4, 1, 75, 333, 128, true, 64, true, true},
                         // 24 rows a KV head (two warps a block); a decode at head_dim 128 (one warp);
                         {1, 8, 1, 3, 200, 64, true, 0, false, false},   {2, 8, 1, 1, 3000, 128, true, 0, true, false},
                         // more queries than keys: the first rows see nothing (with sinks, one of
                         // them -inf); batches holding fewer keys than queries.
                         {1, 4, 2, 100, 37, 64, true, 0, false, false},  {1, 4, 2, 100, 37, 128, true, 0, true, false},
                         {3, 4, 2, 40, 45, 64, true, 0, false, true}};
  for (DType t : {DType::BF16, DType::F16}) {
    for (const Case& c : shapes) {
      const int64_t q_size = c.batch * c.heads * c.q_len * c.dim, kv_size = c.batch * c.kv_heads * c.k_len * c.dim;
      if (q_size + 2 * kv_size > max_elements) continue;
      const HostArray q = random_array(t, q_size, gen), grad_out = random_array(t, q_size, gen);
      HostArray k = random_array(t, kv_size, gen), v = random_array(t, kv_size, gen);
      std::vector<float> sinks(c.heads);
      for (float& s : sinks) s = std::normal_distribution<float>(0.0f, 1.0f)(gen);
      if (c.sinks && c.q_len > c.k_len) sinks[0] = -INFINITY;  // rows of head 0 that see no key see nothing
      std::vector<int32_t> starts(c.batch), lens(c.batch);
      for (int64_t b = 0; b < c.batch; ++b) {
        lens[b] = int32_t(c.k_len - 7 * b);
        starts[b] = int32_t(3 * b);
        // Keys a batch does not hold are never read: NaN there must not reach any output.
        for (int64_t key = 0; c.ranges && key < c.k_len; ++key) {
          if (key >= starts[b] && key < lens[b]) continue;
          for (int64_t i = 0; i < c.kv_heads * c.dim; ++i) {
            const int64_t at = (b * c.kv_heads + i / c.dim) * c.k_len * c.dim + key * c.dim + i % c.dim;
            k.set(at, NAN);
            v.set(at, NAN);
          }
        }
      }
      AttentionArgs a{};
      a.batch = c.batch;
      a.heads = c.heads;
      a.kv_heads = c.kv_heads;
      a.q_len = c.q_len;
      a.k_len = c.k_len;
      a.head_dim = c.dim;
      const int64_t q_stride[3] = {c.heads * c.q_len * c.dim, c.q_len * c.dim, c.dim};
      const int64_t kv_stride[3] = {c.kv_heads * c.k_len * c.dim, c.k_len * c.dim, c.dim};
      for (int i = 0; i < 3; ++i) {
        a.q_stride[i] = a.out_stride[i] = q_stride[i];
        a.k_stride[i] = a.v_stride[i] = kv_stride[i];
      }
      a.scale = 1.0f / std::sqrt(float(c.dim));
      a.causal = c.causal;
      a.window = c.window;

      // CPU: forward, then backward from the CPU's own output and log-sum-exp.
      HostArray out(t, q_size), lse(DType::F32, c.batch * c.heads * c.q_len);
      AttentionArgs host = a;
      host.q = q.bytes.data();
      host.k = k.bytes.data();
      host.v = v.bytes.data();
      host.out = out.data();
      host.lse = static_cast<float*>(lse.data());
      host.sinks = c.sinks ? sinks.data() : nullptr;
      host.kv_starts = c.ranges ? starts.data() : nullptr;
      host.kv_lens = c.ranges ? lens.data() : nullptr;
      cpu::attention_forward(t, host, 0, cpu::attention_forward_tasks(host));
      HostArray delta(DType::F32, c.batch * c.heads * c.q_len);
      for (int64_t row = 0; row < c.batch * c.heads * c.q_len; ++row) {
        float d = 0.0f;
        for (int64_t e = 0; e < c.dim; ++e) d += grad_out.get(row * c.dim + e) * out.get(row * c.dim + e);
        delta.set(row, d);
      }
      HostArray grad_q(t, q_size), grad_k(t, kv_size), grad_v(t, kv_size);
      AttentionGradArgs host_grad{host, grad_out.bytes.data(), {}, static_cast<const float*>(delta.data()),
                                  grad_q.data(), grad_k.data(), grad_v.data()};
      for (int i = 0; i < 3; ++i) host_grad.grad_out_stride[i] = q_stride[i];
      cpu::attention_backward(t, host_grad, 0, c.batch * c.kv_heads);

      // GPU: the same from device copies (the int32 ranges travel as 4-byte "F32" arrays).
      HostArray sink_array(DType::F32, c.heads), start_array(DType::F32, c.batch), len_array(DType::F32, c.batch);
      std::memcpy(sink_array.data(), sinks.data(), 4 * c.heads);
      std::memcpy(start_array.data(), starts.data(), 4 * c.batch);
      std::memcpy(len_array.data(), lens.data(), 4 * c.batch);
      DeviceArray dq(q), dk(k), dv(v), dout(HostArray(t, q_size)), dlse(lse), dsinks(sink_array), dstarts(start_array),
          dlens(len_array);
      AttentionArgs dev_args = a;
      dev_args.q = dq.ptr;
      dev_args.k = dk.ptr;
      dev_args.v = dv.ptr;
      dev_args.out = dout.ptr;
      dev_args.lse = static_cast<float*>(dlse.ptr);
      dev_args.sinks = c.sinks ? static_cast<const float*>(dsinks.ptr) : nullptr;
      dev_args.kv_starts = c.ranges ? static_cast<const int32_t*>(dstarts.ptr) : nullptr;
      dev_args.kv_lens = c.ranges ? static_cast<const int32_t*>(dlens.ptr) : nullptr;
      // The forward under the plan the host would choose, then under each forced form of it
      // (16 or 32 query rows a warp, with the splits that form gets).
      const std::string name = "attention " + std::string(name_of(t)) + " " + std::to_string(c.batch) + "x" +
                               std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + "x" +
                               std::to_string(c.q_len) + "x" + std::to_string(c.k_len) + "x" + std::to_string(c.dim) +
                               (c.causal ? " causal" : "") + (c.window ? " window" : "") + (c.sinks ? " sinks" : "") +
                               (c.ranges ? " ranges" : "");
      for (int warp_rows : {0, 16, 32}) {
        kernels::AttentionPlan plan = kernels::attention_forward_plan(
            dev_args, prop.multiProcessorCount, int64_t(prop.sharedMemPerMultiprocessor), warp_rows);
        DeviceArray part_out(HostArray(DType::F32, plan.splits * q_size)),
            part_lse(HostArray(DType::F32, plan.splits * c.batch * c.heads * c.q_len));
        plan.out = static_cast<float*>(part_out.ptr);
        plan.lse = static_cast<float*>(part_lse.ptr);
        CUDA_OK(cudaMemset(dout.ptr, 0xff, dout.bytes));  // NaN: what a run leaves unwritten fails
        CUDA_OK(cudaMemset(dlse.ptr, 0xff, dlse.bytes));
        CUDA_OK(kernels::attention_forward(dev_args, t, plan, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        const std::string run = name + " (" + (warp_rows == 0 ? "chosen, " : "forced, ") +
                                std::to_string(plan.warp_rows) + " rows a warp, " + std::to_string(plan.splits) +
                                " splits)";
        compare(run, dout.download(t), out, 1e-2f, 2 * rtol(t));
        compare(run + " (lse)", dlse.download(DType::F32), lse, 2e-2f, 1e-3f);
      }

      // Backward from the CPU's forward results, so both sides see identical inputs.
      DeviceArray cpu_out(out), cpu_lse(lse), ddelta(delta), dgrad_out(grad_out), dgq(HostArray(t, q_size)),
          dgk(HostArray(t, kv_size)), dgv(HostArray(t, kv_size));
      AttentionGradArgs dev_grad{dev_args, dgrad_out.ptr, {}, static_cast<const float*>(ddelta.ptr), dgq.ptr,
                                 dgk.ptr, dgv.ptr};
      dev_grad.fwd.out = cpu_out.ptr;
      dev_grad.fwd.lse = static_cast<float*>(cpu_lse.ptr);
      for (int i = 0; i < 3; ++i) dev_grad.grad_out_stride[i] = q_stride[i];
      for (const DeviceArray* grad : {&dgq, &dgk, &dgv}) CUDA_OK(cudaMemset(grad->ptr, 0xff, grad->bytes));  // NaN
      CUDA_OK(kernels::attention_backward(dev_grad, t, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      compare(name + " (grad q)", dgq.download(t), grad_q, 2e-2f, 4 * rtol(t));
      compare(name + " (grad k)", dgk.download(t), grad_k, 2e-2f, 4 * rtol(t));
      compare(name + " (grad v)", dgv.download(t), grad_v, 2e-2f, 4 * rtol(t));
    }
  }
}

// The forward's launch plan (host code: runs without a GPU). Device figures of an H100 SXM
// (132 SMs, 228 KB of shared memory an SM) and an A100 (108 SMs, 164 KB).
static void test_attention_plan() {
  auto args = [](int64_t batch, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t k_len, int64_t dim) {
    AttentionArgs a{};
    a.batch = batch;
    a.heads = heads;
    a.kv_heads = kv_heads;
    a.q_len = q_len;
    a.k_len = k_len;
    a.head_dim = dim;
    a.causal = true;
    return a;
  };
  auto check = [](const std::string& name, const kernels::AttentionPlan& p, int warp_rows, int splits) {
    ++cases;
    const bool ok = p.warp_rows == warp_rows && (splits == 0 ? p.splits > 1 : p.splits == splits) &&
                    p.out == nullptr && p.lse == nullptr;
    if (!ok) {
      ++failures;
      std::printf("FAIL plan %s: %d rows a warp, %d splits\n", name.c_str(), p.warp_rows, p.splits);
    }
  };
  constexpr int kH100Sms = 132, kA100Sms = 108;
  constexpr int64_t kH100Smem = 233472, kA100Smem = 167936;
  // Prefill grids that fill the GPU with 128-row blocks take two row tiles a warp...
  check("H100 1x16/16x4096 D64", kernels::attention_forward_plan(args(1, 16, 16, 4096, 4096, 64), kH100Sms, kH100Smem),
        32, 1);
  check("H100 1x16/16x8192 D128",
        kernels::attention_forward_plan(args(1, 16, 16, 8192, 8192, 128), kH100Sms, kH100Smem), 32, 1);
  // ... unless two such blocks overflow an SM's shared memory (D = 128 on an A100)...
  check("A100 1x16/16x8192 D128",
        kernels::attention_forward_plan(args(1, 16, 16, 8192, 8192, 128), kA100Sms, kA100Smem), 16, 1);
  check("A100 1x16/16x8192 D64", kernels::attention_forward_plan(args(1, 16, 16, 8192, 8192, 64), kA100Sms, kA100Smem),
        32, 1);
  // ... or the grid would leave SMs without two blocks.
  check("H100 1x16/16x1024 D64", kernels::attention_forward_plan(args(1, 16, 16, 1024, 1024, 64), kH100Sms, kH100Smem),
        16, 2);
  // Decode: one row tile of the group's heads, its keys split over many blocks.
  check("H100 decode 1x64/8x1x8192", kernels::attention_forward_plan(args(1, 64, 8, 1, 8192, 64), kH100Sms, kH100Smem),
        16, 0);
  // A forced form is kept, with the splits its blocks need.
  check("H100 decode forced 32", kernels::attention_forward_plan(args(1, 64, 8, 1, 8192, 64), kH100Sms, kH100Smem, 32),
        32, 0);
  check("H100 prefill forced 16",
        kernels::attention_forward_plan(args(1, 16, 16, 4096, 4096, 64), kH100Sms, kH100Smem, 16), 16, 1);
  check("empty batch", kernels::attention_forward_plan(args(0, 16, 16, 4096, 4096, 64), kH100Sms, kH100Smem), 16, 1);
  // Invalid plans are refused before anything is launched.
  const AttentionArgs a = args(1, 4, 4, 8, 8, 64);
  float buffer[1];
  const kernels::AttentionPlan bad[] = {{24, 1, nullptr, nullptr}, {16, 0, nullptr, nullptr},
                                        {16, 65, buffer, buffer}, {32, 2, nullptr, nullptr}};
  for (const kernels::AttentionPlan& p : bad) {
    ++cases;
    if (kernels::attention_forward(a, DType::BF16, p, nullptr) != cudaErrorInvalidValue) {
      ++failures;
      std::printf("FAIL plan {%d rows a warp, %d splits} was not refused\n", p.warp_rows, p.splits);
    }
  }
}

// --bench: each WMMA block tile timed at 4096^3 and GPT-2's prefill shapes (8192 rows), one
// line per run ("gemm-bench dtype MxNxK tile RxC: ms, TFLOP/s"), for bench/gpu_suite.sh.
static void bench_gemm() {
  struct Case {
    int64_t m, n, k;
  };
  const Case shapes[] = {{4096, 4096, 4096}, {8192, 2304, 768}, {8192, 3072, 768}, {8192, 768, 3072}};
  std::mt19937 gen(99);
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  for (DType t : {DType::BF16, DType::F16}) {
    for (const Case& s : shapes) {
      DeviceArray da(random_array(t, s.m * s.k, gen)), db(random_array(t, s.n * s.k, gen, 0.05f)),
          dc(HostArray(t, s.m * s.n));
      const GemmArgs args{da.ptr, db.ptr, dc.ptr, nullptr, nullptr, s.m, s.n, s.k, s.k, s.k, s.n, Activation::None};
      for (int tile = 0; tile < kGemmTiles; ++tile) {
        constexpr int kRuns = 20;
        CUDA_OK(kernels::gemm_wmma(args, t, GemmTile(tile), nullptr));  // warm-up
        CUDA_OK(cudaEventRecord(start));
        for (int r = 0; r < kRuns; ++r) CUDA_OK(kernels::gemm_wmma(args, t, GemmTile(tile), nullptr));
        CUDA_OK(cudaEventRecord(stop));
        CUDA_OK(cudaEventSynchronize(stop));
        float ms = 0.0f;
        CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
        ms /= kRuns;
        const GemmTileShape shape = gemm_tile_shape(GemmTile(tile));
        std::printf("gemm-bench %s %lldx%lldx%lld tile %dx%d: %.4f ms, %.1f TFLOP/s\n", name_of(t),
                    static_cast<long long>(s.m), static_cast<long long>(s.n), static_cast<long long>(s.k), shape.rows,
                    shape.cols, ms, 2.0 * s.m * s.n * s.k / (ms * 1e-3) / 1e12);
      }
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

// --bench, attention: the forward timed under each form of its plan (16 or 32 query rows a
// warp) at the bench's causal prefill shapes, one line per run ("attention-bench dtype
// BxH/HkvxTxTxD warp_rows N: ms, TFLOP/s", FLOPs counted as the bench does: 4 B H T^2 D / 2).
static void bench_attention(const cudaDeviceProp& prop) {
  struct Case {
    int64_t t, dim;
  };
  const Case shapes[] = {{1024, 64}, {4096, 64}, {8192, 64}, {1024, 128}, {4096, 128}, {8192, 128}};
  constexpr int64_t kHeads = 16;
  std::mt19937 gen(7);
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  for (const Case& c : shapes) {
    const int64_t n = kHeads * c.t * c.dim;
    const DType t = DType::BF16;
    DeviceArray dq(random_array(t, n, gen)), dk(random_array(t, n, gen)), dv(random_array(t, n, gen)),
        dout(HostArray(t, n)), dlse(HostArray(DType::F32, kHeads * c.t));
    AttentionArgs a{};
    a.batch = 1;
    a.heads = a.kv_heads = kHeads;
    a.q_len = a.k_len = c.t;
    a.head_dim = c.dim;
    const int64_t stride[3] = {kHeads * c.t * c.dim, c.t * c.dim, c.dim};
    for (int i = 0; i < 3; ++i) a.q_stride[i] = a.k_stride[i] = a.v_stride[i] = a.out_stride[i] = stride[i];
    a.scale = 1.0f / std::sqrt(float(c.dim));
    a.causal = true;
    a.q = dq.ptr;
    a.k = dk.ptr;
    a.v = dv.ptr;
    a.out = dout.ptr;
    a.lse = static_cast<float*>(dlse.ptr);
    for (int warp_rows : {16, 32}) {
      const kernels::AttentionPlan plan = kernels::attention_forward_plan(
          a, prop.multiProcessorCount, int64_t(prop.sharedMemPerMultiprocessor), warp_rows);
      if (plan.splits != 1) continue;  // prefill shapes fill the GPU without split-KV
      constexpr int kRuns = 10;
      CUDA_OK(kernels::attention_forward(a, t, plan, nullptr));  // warm-up
      CUDA_OK(cudaEventRecord(start));
      for (int r = 0; r < kRuns; ++r) CUDA_OK(kernels::attention_forward(a, t, plan, nullptr));
      CUDA_OK(cudaEventRecord(stop));
      CUDA_OK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
      ms /= kRuns;
      const double flops = 4.0 * kHeads * double(c.t) * double(c.t) * double(c.dim) / 2;
      std::printf("attention-bench %s 1x%lld/%lldx%lldx%lldx%lld causal warp_rows %d: %.4f ms, %.1f TFLOP/s\n",
                  name_of(t), static_cast<long long>(kHeads), static_cast<long long>(kHeads),
                  static_cast<long long>(c.t), static_cast<long long>(c.t), static_cast<long long>(c.dim),
                  plan.warp_rows, ms, flops / (ms * 1e-3) / 1e12);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

int main(int argc, char** argv) {
  bool bench = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--small") {
      max_elements = 1 << 20;
    } else if (std::string(argv[i]) == "--bench") {
      bench = true;
    } else {
      std::printf("usage: %s [--small | --bench]\n", argv[0]);
      return 2;
    }
  }
  test_attention_plan();  // host code: checked with or without a GPU
  if (failures) {
    std::printf("%d cases, %d failed (before any device test)\n", cases, failures);
    return 1;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skipped: no CUDA device (the %d host cases passed)\n", cases);
    return 77;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const int arch = kernels::kernels_binary_arch(0);
  std::printf("device: %s (sm_%d%d), kernel binary sm_%d\n", prop.name, prop.major, prop.minor, arch);
  if (arch == 0) {
    std::printf("FAIL: the kernels were not built for this GPU\n");
    return 1;
  }
  if (bench) {
    if (prop.major < 8) {
      std::printf("skipped: the WMMA GEMM and the attention kernels need sm_80+\n");
      return 77;
    }
    bench_gemm();
    bench_attention(prop);
    return 0;
  }
  std::mt19937 gen(1234);
  test_softmax(gen);
  test_cross_entropy(gen);
  test_layernorm(gen);
  test_expert_linear(gen, prop.major >= 8);  // its grouped form runs on the WMMA GEMM
  test_rope(gen);
  if (prop.major >= 8) {
    test_gemm(gen);
    test_attention(gen, prop);
  } else {
    std::printf("skipping the tensor-core kernels (GEMM, attention): they need sm_80+\n");
  }
  std::printf("%d cases, %d failed\n", cases, failures);
  return failures ? 1 : 0;
}
