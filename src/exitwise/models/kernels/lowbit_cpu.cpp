// Batch-invariant int4 / int8 weight x int8-quantised activation matmul for x86 CPUs with AVX2 + FMA.
//
// Each input row is quantised to int8 per group of 32 columns (scale = max|x| / 127, round to nearest
// even), as llama.cpp's Q8 activations are. A group's products are then integer: one maddubs (u8 x s8
// pairs into int16) and one madd (pairs into int32), eight int32 lanes converted to float and FMA'd,
// times the weight scale x the activation scale, into one 8-lane float32 accumulator per output and
// row. That is about a third of the instructions of converting the weights to float32 per group, and
// the CPU, not memory, is what limits a decode step here.
//
// Every output y[m][n] takes, group after group, that same sequence, then one fixed horizontal sum (and
// for int4 one fixed-order dot product with the zero-point terms). Tiles over rows and outputs only
// change which accumulators are live together, and threads split outputs, never a sum, so a row's
// result does not depend on how many rows came with it nor on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int G = 32;  // input columns per group: one activation scale, one int4 scale / zero

// Rows quantised per group: q (M, K) int8, d (M, K/G) float32 scales; for int4 also aux (M, 2, K/G):
// -8 d sum(q) and sum(x) per group (the terms of the weights' -8 offset and zero point, see Int4).
struct QRows {
  const int8_t* q;
  const float* d;
  const float* aux;
  int64_t K;
};

// int4 weight bytes unpack to the group's columns 0,2,..,30 (low nibbles) then 1,3,..,31 (high), so
// their activations are quantised in that order; int8 weights keep the columns' order.
void quantize(const float* x, int8_t* q, float* d, float* aux, int64_t M, int64_t K, bool int4_order) {
  const int64_t ng = K / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* xs = x + m * K + g * G;
      float v[G];
      for (int j = 0; j < G; ++j) v[j] = int4_order ? xs[j < 16 ? 2 * j : 2 * (j - 16) + 1] : xs[j];
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < G; ++j) {
        amax = std::max(amax, std::fabs(v[j]));
        sum += v[j];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qsum = 0;
      int8_t* qg = q + m * K + g * G;
      for (int j = 0; j < G; ++j) {
        const int32_t t = static_cast<int32_t>(std::nearbyint(v[j] * inv));
        qg[j] = static_cast<int8_t>(t);
        qsum += t;
      }
      const float dg = amax / 127.f;
      d[m * ng + g] = dg;
      if (aux) {
        aux[m * 2 * ng + g] = -8.f * dg * static_cast<float>(qsum);
        aux[m * 2 * ng + ng + g] = sum;
      }
    }
}

inline float hsum(__m256 a) {  // one fixed order: halves, then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* a, const float* b, int64_t n) {  // one fixed order for every n
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

// int4 output n: (N, K/2) bytes of nibbles q in 0..15 and sz (N, 2, K/G) float32, scales then zeros:
// w = (q - 8) s + z, so sum(w x) = s d sum(q xq) + s (-8 d sum(xq)) + z sum(x), the last two terms
// one dot product of the output's (s, z) with the row's aux.
struct Int4 {
  static constexpr bool kSigned = false;
  const uint8_t* w;
  const float* sz;
  int64_t K;
  inline void prefetch(int64_t n, int64_t g) const {  // a hint: past the end is harmless
    _mm_prefetch(reinterpret_cast<const char*>(w + n * (K / 2) + g * 16), _MM_HINT_T0);
  }
  inline __m256i load(int64_t n, int64_t g) const {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + g * 16));
    const __m128i mask = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
  }
  inline float scale(int64_t n, int64_t g) const { return sz[n * 2 * (K / G) + g]; }
  inline float finish(float v, int64_t n, const QRows& x, int64_t m) const {
    const int64_t ng = K / G;
    return v + dot(sz + n * 2 * ng, x.aux + m * 2 * ng, 2 * ng);
  }
};

// int8 output n: (N, K) int8 in -127..127 and one float32 scale per output, applied to the finished sum.
struct Int8 {
  static constexpr bool kSigned = true;
  const int8_t* w;
  const float* s;
  int64_t K;
  inline void prefetch(int64_t n, int64_t g) const {
    _mm_prefetch(reinterpret_cast<const char*>(w + n * K + g * G), _MM_HINT_T0);
  }
  inline __m256i load(int64_t n, int64_t g) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + g * G));
  }
  inline float scale(int64_t, int64_t) const { return 1.f; }
  inline float finish(float v, int64_t n, const QRows&, int64_t) const { return v * s[n]; }
};

// NT outputs from n0 x RT rows from m0. A tile loads each output's group once for all RT rows.
template <int NT, int RT, class W>
inline void tile(const W& wt, const QRows& x, float* y, int64_t N, int64_t n0, int64_t m0) {
  const int64_t K = x.K, ng = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NT][RT];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    for (int t = 0; t < NT; ++t) {
      wt.prefetch(n0 + t, g + 8);  // NT row streams at once: the hardware prefetcher alone lags (measured)
      const __m256i w = wt.load(n0 + t, g);
      // maddubs multiplies unsigned by signed bytes: signed weights lend their sign to the activations
      const __m256i uw = W::kSigned ? _mm256_sign_epi8(w, w) : w;
      const float s = wt.scale(n0 + t, g);
      for (int r = 0; r < RT; ++r) {
        __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (m0 + r) * K + g * G));
        if (W::kSigned) xq = _mm256_sign_epi8(xq, w);
        // |pairs| <= 2 * 127 * 127 < 2^15: maddubs never saturates
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(uw, xq), ones);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * x.d[(m0 + r) * ng + g]), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) y[(m0 + r) * N + n0 + t] = wt.finish(hsum(acc[t][r]), n0 + t, x, m0 + r);
}

// Rows [m, m + R) of outputs [n, n + 4), R < 8: enough accumulator chains in flight to hide an FMA's
// latency, and at most 16 vector registers.
template <int R, class W>
inline void rest(const W& wt, const QRows& x, float* y, int64_t N, int64_t n, int64_t m) {
  if constexpr (R <= 2) {
    tile<4, R>(wt, x, y, N, n, m);
  } else if constexpr (R <= 4) {
    for (int t = 0; t < 4; t += 2) tile<2, R>(wt, x, y, N, n + t, m);
  } else {
    for (int t = 0; t < 4; ++t) tile<1, R>(wt, x, y, N, n + t, m);
  }
}

// Outputs [n0, n1) (a multiple of 4) for all M rows, rows walked in chunks whose activations stay in
// cache while the outputs pass.
template <class W>
void run(const W& wt, const QRows& x, float* y, int64_t M, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t CHUNK = 64;
  for (int64_t c = 0; c < M; c += CHUNK) {
    const int64_t ce = std::min(M, c + CHUNK);
    for (int64_t n = n0; n < n1; n += 4) {
      int64_t m = c;
      for (; m + 8 <= ce; m += 8)
        for (int t = 0; t < 4; ++t) tile<1, 8>(wt, x, y, N, n + t, m);
      switch (ce - m) {
        case 1: rest<1>(wt, x, y, N, n, m); break;
        case 2: rest<2>(wt, x, y, N, n, m); break;
        case 3: rest<3>(wt, x, y, N, n, m); break;
        case 4: rest<4>(wt, x, y, N, n, m); break;
        case 5: rest<5>(wt, x, y, N, n, m); break;
        case 6: rest<6>(wt, x, y, N, n, m); break;
        case 7: rest<7>(wt, x, y, N, n, m); break;
        default: break;
      }
    }
  }
}

template <class W>
torch::Tensor matmul(const W& wt, const torch::Tensor& x, int64_t N, bool int4) {
  const int64_t M = x.size(0), K = x.size(1), ng = K / G;
  auto q = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto d = torch::empty({M, ng}, x.options());
  auto aux = int4 ? torch::empty({M, 2, ng}, x.options()) : torch::Tensor();
  quantize(x.data_ptr<float>(), q.data_ptr<int8_t>(), d.data_ptr<float>(), int4 ? aux.data_ptr<float>() : nullptr,
           M, K, int4);
  const QRows xr{q.data_ptr<int8_t>(), d.data_ptr<float>(), int4 ? aux.data_ptr<float>() : nullptr, K};
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  // threads take whole groups of 4 outputs (N is a multiple of 4), never part of a sum
  at::parallel_for(0, N / 4, 16, [&](int64_t b, int64_t e) { run(wt, xr, yp, M, N, b * 4, e * 4); });
  return y;
}

void check(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) CPU tensor");
  TORCH_CHECK(x.size(1) == K && K % G == 0, "x has ", x.size(1), " columns, the weight ", K, " (a multiple of 32)");
}

}  // namespace

// x (M, K) float32, w (N, K/2) uint8 nibbles, sz (N, 2, K/32) float32 scales then zeros -> (M, N)
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz) {
  const int64_t N = w.size(0), K = w.size(1) * 2;
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.is_contiguous() && N % 4 == 0, "bad int4 weight");
  TORCH_CHECK(sz.scalar_type() == torch::kFloat && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == N &&
              sz.size(1) == 2 && sz.size(2) == K / G, "bad int4 scales");
  return matmul(Int4{w.data_ptr<uint8_t>(), sz.data_ptr<float>(), K}, x, N, true);
}

// x (M, K) float32, w (N, K) int8, scale (N,) float32 -> (M, N): (x . q_n) * scale_n
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  const int64_t N = w.size(0), K = w.size(1);
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kChar && w.is_contiguous() && N % 4 == 0, "bad int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == N, "bad int8 scales");
  return matmul(Int8{w.data_ptr<int8_t>(), scale.data_ptr<float>(), K}, x, N, false);
}

// x (N, D) float32, w (D,) float32 or an empty tensor (no weight) -> x / sqrt(mean(x^2) + eps) * w.
// One call instead of aten's composite (~35 us of dispatch at a 576-wide row, the cost of the sum many
// times over), each row in one fixed order, so batch-invariant like the matmuls.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 (N, D) CPU tensor");
  const int64_t N = x.size(0), D = x.size(1);
  const bool weighted = w.numel() > 0;
  TORCH_CHECK(!weighted || (w.scalar_type() == torch::kFloat && w.is_contiguous() && w.numel() == D), "bad norm weight");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weighted ? w.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = xp + n * D;
    float* yr = yp + n * D;
    const float r = 1.f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 rv = _mm256_set1_ps(r);
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xr + i), rv);
      if (weighted) v = _mm256_mul_ps(v, _mm256_loadu_ps(wp + i));
      _mm256_storeu_ps(yr + i, v);
    }
    for (; i < D; ++i) yr[i] = weighted ? xr[i] * r * wp[i] : xr[i] * r;
  }
  return y;
}


// exp of 8 floats: 2^(x log2 e) split into 2^n (exponent bits) times a degree-6 polynomial of the
// remainder, |relative error| < 2e-7 over the softmax's range (x <= 0); one fixed sequence of
// operations, so the same input always gives the same bits.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));  // below: 2^n underflows; exp is 0 to float precision
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);  // in [-0.5, 0.5]
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {  // exp8's arithmetic on one value (lane 0)
  return _mm_cvtss_f32(_mm256_castps256_ps128(exp8(_mm256_set1_ps(x))));
}

// One query head against its keys: softmax(q . k_j * scale) . v_j over j = 0..len-1 in the order given.
void attend_one(const float* q, const float* kp, const float* vp, const int64_t* idx, int64_t len, int64_t row,
                int64_t hd, float scale, float* sc, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    const float s = dot(q, kp + idx[j] * row, hd) * scale;
    sc[j] = s;
    mx = std::max(mx, s);
  }
  const __m256 m = _mm256_set1_ps(mx);
  int64_t j = 0;
  __m256 tot = _mm256_setzero_ps();
  for (; j + 8 <= len; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), m));
    _mm256_storeu_ps(sc + j, e);
    tot = _mm256_add_ps(tot, e);
  }
  float sum = hsum(tot);
  for (; j < len; ++j) {
    sc[j] = exp1(sc[j] - mx);
    sum += sc[j];
  }
  const float inv = 1.f / sum;
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(sc[t]), _mm256_loadu_ps(vp + idx[t] * row + d), acc);
    _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
  }
  for (; d < hd; ++d) {
    float acc = 0.f;
    for (int64_t t = 0; t < len; ++t) acc = std::fma(sc[t], vp[idx[t] * row + d], acc);
    out[d] = acc * inv;
  }
}

// q (N, H, hd) float32; k, v pools (S, H_kv, hd) float32; query row n attends to the pool rows
// idx[start[n] .. start[n] + len[n]) in that order -> (N, H hd). Each (row, head) is computed alone in
// one fixed order, so a query gets the same bits in a 1-row decode, a batch of rows with other
// lengths, or a verification chunk: the attention half of a batch-invariant step.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& idx,
                        const torch::Tensor& start, const torch::Tensor& len, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.dim() == 3 && q.is_contiguous(), "q must be contiguous float32 (N, H, hd)");
  TORCH_CHECK(k.scalar_type() == torch::kFloat && k.dim() == 3 && k.is_contiguous() && v.sizes() == k.sizes() &&
              v.is_contiguous() && v.scalar_type() == torch::kFloat, "k and v must be contiguous float32 (S, H_kv, hd)");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && start.scalar_type() == torch::kLong && len.scalar_type() == torch::kLong &&
              idx.is_contiguous() && start.is_contiguous() && len.is_contiguous(), "idx, start, len must be contiguous int64");
  const int64_t N = q.size(0), H = q.size(1), hd = q.size(2), S = k.size(0), hkv = k.size(1);
  TORCH_CHECK(k.size(2) == hd && H % hkv == 0 && start.numel() == N && len.numel() == N, "attention shapes disagree");
  const int64_t group = H / hkv, row = hkv * hd, ni = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  int64_t most = 0;
  for (int64_t n = 0; n < N; ++n) {  // entries no query reads may be placeholders (freed blocks)
    TORCH_CHECK(lp[n] >= 1 && sp[n] >= 0 && sp[n] + lp[n] <= ni, "query ", n, " reads outside the key index");
    for (int64_t j = sp[n]; j < sp[n] + lp[n]; ++j)
      TORCH_CHECK(ip[j] >= 0 && ip[j] < S, "query ", n, " reads pool row ", ip[j], " outside the pool of ", S);
    most = std::max(most, lp[n]);
  }
  auto out = torch::empty({N, H * hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t b, int64_t e) {
    std::vector<float> sc(most);
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / H, h = nh % H, kvh = h / group;
      attend_one(qp + nh * hd, kp + kvh * hd, vp + kvh * hd, ip + sp[n], lp[n], row, hd, static_cast<float>(scale),
                 sc.data(), op + nh * hd);
    }
  });
  return out;
}

// Also as dispatcher ops (torch.ops.exitwise_lowbit.*), which torch.compile traces (their shapes are
// registered in Python); eager calls take the lighter pybind entry points below.
TORCH_LIBRARY(exitwise_lowbit, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor sz) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor idx, Tensor start, Tensor len, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(exitwise_lowbit, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("rms_norm", &rms_norm);
  m.impl("attention", &attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weight x int8-quantised activations, batch-invariant");
  m.def("int8_mm", &int8_mm, "int8 weight x int8-quantised activations, batch-invariant");
  m.def("rms_norm", &rms_norm, "RMS norm of float32 rows in one call, batch-invariant");
  m.def("attention", &attention, "attention of each query over its own keys, batch-invariant");
}
