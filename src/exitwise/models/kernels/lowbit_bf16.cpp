// int4 weight x bfloat16 activation matmul for x86 CPUs with AVX512-BF16, batch-invariant.
//
// The AVX2 kernel (lowbit_cpu.cpp) quantises activations to int8 and pays, for every row, an integer
// product, a conversion and a float scale per group of 32 columns: a 5-row verification pass costs
// ~3x one row. Here each output's group of 32 weights is expanded once to bfloat16 values
// w = (q - 8) s + z (one FMA per group for the 16 levels, rounded to bfloat16, then a 16-entry table
// lookup per column), and each row then costs one VDPBF16PS per group: 32 products into 16 float32
// lanes. Activations are rounded to bfloat16 once per call.
//
// Batch invariance: every (row, output) pair has its own accumulator, which takes the same sequence of
// VDPBF16PS over the groups and one fixed horizontal sum, whatever rows and outputs share its tile;
// threads split outputs, never a sum.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int G = 32;   // input columns per group: one int4 scale / zero
constexpr int NT = 2;     // outputs per tile: a row's load serves both
constexpr int RMAX = 12;  // rows per tile: NT * RMAX accumulators, NT weight and one row register of 32

// Rows (M, K) float32 -> bfloat16 (round to nearest even), K a multiple of 32.
void to_bf16(const float* x, uint16_t* xb, int64_t M, int64_t K) {
  for (int64_t i = 0; i < M * K; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(reinterpret_cast<void*>(xb + i), reinterpret_cast<__m512i>(v));
  }
}

// Output n's group g as 32 bfloat16 weights in column order: byte j holds column 2j (low nibble) and
// 2j + 1 (high); sz (N, 2, K/G): scales then zeros.
inline __m512i weights(const uint8_t* w, const float* sz, int64_t K, int64_t n, int64_t g) {
  const int64_t ng = K / G;
  const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512 vals = _mm512_fmadd_ps(levels, _mm512_set1_ps(sz[n * 2 * ng + g]), _mm512_set1_ps(sz[n * 2 * ng + ng + g]));
  const __m512i table = _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(vals)));
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + g * 16)));
  const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(0xF));
  const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0xF0)), 12);
  return _mm512_permutexvar_epi16(_mm512_or_si512(lo, hi), table);  // word 2j: column 2j, 2j + 1: 2j + 1
}

template <int RT>
void tile(const uint8_t* w, const float* sz, const uint16_t* xb, float* y, int64_t K, int64_t N, int64_t n0,
          int64_t m0) {
  __m512 acc[NT][RT];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    __m512i wv[NT];
    for (int t = 0; t < NT; ++t) wv[t] = weights(w, sz, K, n0 + t, g);
    for (int r = 0; r < RT; ++r) {
      const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(xb + (m0 + r) * K + g * G));
      for (int t = 0; t < NT; ++t)
        acc[t][r] = _mm512_dpbf16_ps(acc[t][r], reinterpret_cast<__m512bh>(wv[t]), reinterpret_cast<__m512bh>(xv));
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) y[(m0 + r) * N + n0 + t] = _mm512_reduce_add_ps(acc[t][r]);
}

// Outputs [n0, n1) (pairs) for all M rows, RMAX rows at a time.
void run(const uint8_t* w, const float* sz, const uint16_t* xb, float* y, int64_t M, int64_t K, int64_t N,
         int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += NT)
    for (int64_t m = 0; m < M; m += RMAX) {
      switch (std::min<int64_t>(RMAX, M - m)) {
        case 1: tile<1>(w, sz, xb, y, K, N, n, m); break;
        case 2: tile<2>(w, sz, xb, y, K, N, n, m); break;
        case 3: tile<3>(w, sz, xb, y, K, N, n, m); break;
        case 4: tile<4>(w, sz, xb, y, K, N, n, m); break;
        case 5: tile<5>(w, sz, xb, y, K, N, n, m); break;
        case 6: tile<6>(w, sz, xb, y, K, N, n, m); break;
        case 7: tile<7>(w, sz, xb, y, K, N, n, m); break;
        case 8: tile<8>(w, sz, xb, y, K, N, n, m); break;
        case 9: tile<9>(w, sz, xb, y, K, N, n, m); break;
        case 10: tile<10>(w, sz, xb, y, K, N, n, m); break;
        case 11: tile<11>(w, sz, xb, y, K, N, n, m); break;
        default: tile<RMAX>(w, sz, xb, y, K, N, n, m); break;
      }
    }
}

}  // namespace

// x (M, K) float32, w (N, K/2) uint8 nibbles, sz (N, 2, K/32) float32 scales then zeros -> (M, N) float32
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz) {
  const int64_t N = w.size(0), K = w.size(1) * 2, M = x.size(0);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) CPU tensor");
  TORCH_CHECK(x.size(1) == K && K % G == 0, "x has ", x.size(1), " columns, the weight ", K, " (a multiple of 32)");
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.is_contiguous() && N % NT == 0, "bad int4 weight");
  TORCH_CHECK(sz.scalar_type() == torch::kFloat && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == N &&
              sz.size(1) == 2 && sz.size(2) == K / G, "bad int4 scales");
  auto xb = torch::empty({M, K}, x.options().dtype(torch::kBFloat16));
  uint16_t* xp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
  to_bf16(x.data_ptr<float>(), xp, M, K);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sz.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // threads take whole pairs of outputs, never part of a sum
  at::parallel_for(0, N / NT, 16, [&](int64_t b, int64_t e) { run(wp, sp, xp, yp, M, K, N, b * NT, e * NT); });
  return y;
}

TORCH_LIBRARY(exitwise_bf16, m) { m.def("int4_mm(Tensor x, Tensor w, Tensor sz) -> Tensor"); }
TORCH_LIBRARY_IMPL(exitwise_bf16, CPU, m) { m.impl("int4_mm", &int4_mm); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weight x bfloat16 activations (AVX512-BF16), batch-invariant");
}
