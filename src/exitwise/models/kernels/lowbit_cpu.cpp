// Batch-invariant int4 / int8 weight x float32 activation matmul for x86 CPUs with AVX2 + FMA.
//
// Every output y[m][n] is one 8-lane float32 accumulator that takes, group after group of 32 input
// columns, the same four FMAs (dequantised weights x activations), then one fixed horizontal sum. Tiles
// over rows and outputs only change which accumulators are live together, never that sequence, so a
// row's result does not depend on how many rows came with it, nor on the thread count (threads split
// the outputs, never a reduction). A tile converts its weights once and FMAs them into every row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int G = 32;  // input columns per group: one int4 scale / zero, four 8-lane vectors

// Activations in the order the weight bytes unpack in: per group of 32, byte j holds column 2j (low
// nibble) and 2j + 1 (high), so the vectors are columns 0,2..14 | 16,18..30 | 1,3..15 | 17,19..31.
// x (M, K) -> xp (M, K). int8 weights keep their column order, so they skip this.
void permute_groups(const float* x, float* xp, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K; g += G)
      for (int j = 0; j < 16; ++j) {
        xp[m * K + g + j] = x[m * K + g + 2 * j];
        xp[m * K + g + 16 + j] = x[m * K + g + 2 * j + 1];
      }
}

// int4 group of output n: 16 bytes of nibbles and a (scale, zero) bfloat16 pair packed in a uint32
// (scale low half); w = (q - 8) * scale + zero, as QuantizedLinear.dequantize.
struct Int4 {
  const uint8_t* w;      // (N, K/2)
  const uint32_t* sz;    // (N, K/G)
  int64_t K;
  inline void prefetch(int64_t n, int64_t g) const {  // a hint: past the end is harmless
    _mm_prefetch(reinterpret_cast<const char*>(w + n * (K / 2) + g * 16), _MM_HINT_T0);
  }
  inline void load(int64_t n, int64_t g, __m256 v[4]) const {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + g * 16));
    const __m128i mask = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
    const uint32_t p = sz[n * (K / G) + g];
    const __m256 s = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(p << 16)));
    const __m256 z = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(p & 0xFFFF0000u)));
    v[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), s, z);
    v[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo))), s, z);
    v[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), s, z);
    v[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi))), s, z);
  }
};

// int8 row n, columns g*32..+32 as floats; the per-row scale multiplies the finished dot product.
struct Int8 {
  const int8_t* w;  // (N, K)
  int64_t K;
  inline void prefetch(int64_t, int64_t) const {}  // left to the hardware (the head beats aten without)
  inline void load(int64_t n, int64_t g, __m256 v[4]) const {
    const int8_t* p = w + n * K + g * G;
    for (int i = 0; i < 4; ++i)
      v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  }
};

inline float hsum(__m256 a) {  // one fixed order: halves, then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NT outputs from n0 x RT rows from m0: y[m][n] = sum over groups of the four FMAs, then hsum.
template <int NT, int RT, class W>
inline void tile(const W& wt, const float* xp, float* y, int64_t K, int64_t N, int64_t n0, int64_t m0) {
  __m256 acc[NT][RT];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    const float* xg = xp + m0 * K + g * G;
    for (int t = 0; t < NT; ++t) {
      wt.prefetch(n0 + t, g + 8);  // NT row streams at once: the hardware prefetcher alone lags (measured)
      __m256 w[4];  // converted once, used by all RT rows (their activations stay in memory operands)
      wt.load(n0 + t, g, w);
      for (int r = 0; r < RT; ++r) {
        const float* xr = xg + r * K;
        acc[t][r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr), acc[t][r]);
        acc[t][r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), acc[t][r]);
        acc[t][r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), acc[t][r]);
        acc[t][r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) y[(m0 + r) * N + n0 + t] = hsum(acc[t][r]);
}

// Rows [m, m + rem) of outputs [n, n + 4), rem < 8, with at least four accumulator chains in flight
// (an FMA's latency is several cycles; one chain would wait on itself) and at most 16 vector registers.
template <int R, class W>
inline void rest(const W& wt, const float* xp, float* y, int64_t K, int64_t N, int64_t n, int64_t m) {
  if constexpr (R <= 2) {
    tile<4, R>(wt, xp, y, K, N, n, m);
  } else if constexpr (R == 3) {
    for (int t = 0; t < 4; t += 2) tile<2, 3>(wt, xp, y, K, N, n + t, m);
  } else {
    for (int t = 0; t < 4; ++t) tile<1, R>(wt, xp, y, K, N, n + t, m);
  }
}

// Outputs [n0, n1) (a multiple of 4) for all M rows: each output's weights are converted once per 8
// rows. Rows are walked in chunks so a chunk's activations stay in cache while the outputs pass.
template <class W>
void run(const W& wt, const float* xp, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t CHUNK = 64;
  for (int64_t c = 0; c < M; c += CHUNK) {
    const int64_t ce = std::min(M, c + CHUNK);
    for (int64_t n = n0; n < n1; n += 4) {
      int64_t m = c;
      for (; m + 8 <= ce; m += 8)
        for (int t = 0; t < 4; ++t) tile<1, 8>(wt, xp, y, K, N, n + t, m);
      switch (ce - m) {
        case 1: rest<1>(wt, xp, y, K, N, n, m); break;
        case 2: rest<2>(wt, xp, y, K, N, n, m); break;
        case 3: rest<3>(wt, xp, y, K, N, n, m); break;
        case 4: rest<4>(wt, xp, y, K, N, n, m); break;
        case 5: rest<5>(wt, xp, y, K, N, n, m); break;
        case 6: rest<6>(wt, xp, y, K, N, n, m); break;
        case 7: rest<7>(wt, xp, y, K, N, n, m); break;
        default: break;
      }
    }
  }
}

template <class W>
void dispatch(const W& wt, const float* xp, float* y, int64_t M, int64_t K, int64_t N) {
  // threads take whole groups of 4 outputs (N is a multiple of 4), never part of a sum
  at::parallel_for(0, N / 4, 16, [&](int64_t b, int64_t e) { run(wt, xp, y, M, K, N, b * 4, e * 4); });
}

void check(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) CPU tensor");
  TORCH_CHECK(x.size(1) == K && K % G == 0, "x has ", x.size(1), " columns, the weight ", K, " (a multiple of 32)");
}

}  // namespace

// x (M, K) float32, w (N, K/2) uint8 nibbles, sz (N, K/32) int32 = (scale, zero) bfloat16 pairs -> (M, N)
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz) {
  const int64_t N = w.size(0), K = w.size(1) * 2, M = x.size(0);
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.is_contiguous() && N % 4 == 0, "bad int4 weight");
  TORCH_CHECK(sz.scalar_type() == torch::kInt && sz.is_contiguous() && sz.size(0) == N && sz.size(1) == K / G,
              "bad int4 scales");
  auto xp = torch::empty_like(x);
  permute_groups(x.data_ptr<float>(), xp.data_ptr<float>(), M, K);
  auto y = torch::empty({M, N}, x.options());
  const Int4 wt{w.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(sz.data_ptr<int32_t>()), K};
  dispatch(wt, xp.data_ptr<float>(), y.data_ptr<float>(), M, K, N);
  return y;
}

// x (M, K) float32, w (N, K) int8, scale (N,) float32 -> (M, N): (x . q_n) * scale_n
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kChar && w.is_contiguous() && N % 4 == 0, "bad int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == N, "bad int8 scales");
  auto y = torch::empty({M, N}, x.options());
  const Int8 wt{w.data_ptr<int8_t>(), K};
  dispatch(wt, x.data_ptr<float>(), y.data_ptr<float>(), M, K, N);
  return y.mul_(scale);
}

// Also as dispatcher ops (torch.ops.exitwise_lowbit.*), which torch.compile traces (their shapes are
// registered in Python); eager calls take the lighter pybind entry points below.
TORCH_LIBRARY(exitwise_lowbit, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor sz) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(exitwise_lowbit, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weight x float32 activations, batch-invariant");
  m.def("int8_mm", &int8_mm, "int8 weight x float32 activations, batch-invariant");
}
