// Batch-invariant int4 / int8 weight x int8-quantised activation matmul for x86 CPUs with AVX2 + FMA
// (and int4 x bfloat16 on CPUs with AVX512-BF16, in its own section further down; VPDPBUSD for the
// integer products, VPDPWSSD for the k-quants' scaled sums, where the CPU has AVX512-VNNI).
//
// Each input row is quantised to int8 per group of 32 columns (scale = max|x| / 127, round to nearest
// even), as llama.cpp's Q8 activations are. A group's products are then integer: one maddubs (u8 x s8
// pairs into int16) and one madd (pairs into int32), eight int32 lanes converted to float and FMA'd,
// times the weight scale x the activation scale, into one 8-lane float32 accumulator per output and
// row. That is about a third of the instructions of converting the weights to float32 per group, and
// the CPU, not memory, is what limits a decode step here.
//
// int4 takes two groups at a time: one 32-byte load holds both groups' nibbles, the low nibbles of the
// two in one vector and the high ones in another, each 128-bit half one group. Two maddubs, an int16
// add and one madd give four int32 lanes per group, converted and FMA'd once with a vector of the two
// groups' scales: half the instructions per weight of one group at a time (1.2-1.4x at one row, 1.2-1.5x
// at 5-16 rows, measured by benchmarks/kernels.py). A last unpaired group takes the one-group sequence.
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
#include <cstring>
#include <optional>
#include <type_traits>
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
  const float* d8;  // int4: (M, K/64, 8) each pair of groups' scales, d_g four times then d_g+1 four times
};

// int4 weight bytes unpack to a group's columns 0,2,..,30 (low nibbles) and 1,3,..,31 (high), so their
// activations are stored in that order: per pair of groups g, g+1 as g's even columns, g+1's even, g's
// odd, g+1's odd; a last unpaired group as its even columns, then its odd. int8 weights keep the
// columns' order.
void quantize(const float* x, int8_t* q, float* d, float* aux, float* d8, int64_t M, int64_t K, bool int4_order) {
  const int64_t ng = K / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const float* xs = x + m * K + g * G;
      float amax = 0.f, sum = 0.f;
      for (int j = 0; j < G; ++j) {
        amax = std::max(amax, std::fabs(xs[j]));
        sum += xs[j];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t qsum = 0;
      const bool paired = int4_order && (g % 2 == 1 || g + 1 < ng);
      int8_t* base = q + m * K + (paired ? (g & ~int64_t(1)) * G : g * G);
      const int half = paired ? static_cast<int>(g & 1) * 16 : 0, odd = paired ? 32 : 16;
      for (int j = 0; j < G; ++j) {
        const int32_t t = static_cast<int32_t>(std::nearbyint(xs[j] * inv));
        const int at = !int4_order ? j : (j % 2 == 0 ? half + j / 2 : odd + half + j / 2);
        base[at] = static_cast<int8_t>(t);
        qsum += t;
      }
      const float dg = amax / 127.f;
      d[m * ng + g] = dg;
      if (aux) {
        aux[m * 2 * ng + g] = -8.f * dg * static_cast<float>(qsum);
        aux[m * 2 * ng + ng + g] = sum;
      }
      if (d8 && paired)
        for (int l = 0; l < 4; ++l) d8[m * (ng / 2) * 8 + (g / 2) * 8 + (g & 1) * 4 + l] = dg;
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

// 16 bytes of nibbles -> one group's 32 values: the low nibbles in the low 128 bits, the high ones above
inline __m256i split16(const uint8_t* b) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i mask = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

// 32 bytes of nibbles (two groups) -> their low nibbles (lo) and high nibbles (hi), each 128-bit half one group
inline void split32(const uint8_t* b, __m256i& lo, __m256i& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m256i mask = _mm256_set1_epi8(15);
  lo = _mm256_and_si256(v, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

// two consecutive float scales -> lanes 0-3 the first, 4-7 the second
inline __m256 two_scales(const float* s) {
  const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// u8 x s8 bytes multiplied and summed in fours into eight int32 lanes: maddubs (pairs into int16) and
// madd (pairs into int32), or one VPDPBUSD where the build has AVX512-VNNI (kernels.cflags adds it on
// CPUs that have it). The same integers either way: no pair sum here reaches maddubs' int16 saturation.
inline __m256i dot4(__m256i u, __m256i s) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// dot4(u0, s0) + dot4(u1, s1), each product pair sum <= 2^15 in magnitude and their sum too
inline __m256i dot4x2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                           _mm256_set1_epi16(1));
#endif
}

// int4 output n: (N, K/2) bytes of nibbles q in 0..15 and sz (N, 2, K/G) float32, scales then zeros:
// w = (q - 8) s + z, so sum(w x) = s d sum(q xq) + s (-8 d sum(xq)) + z sum(x), the last two terms
// one dot product of the output's (s, z) with the row's aux.
struct Int4 {
  static constexpr bool kSigned = false;
  static constexpr bool kPairs = true;
  static constexpr bool kPlanes = false;
  const uint8_t* w;
  const float* sz;
  int64_t K;
  inline void prefetch(int64_t n, int64_t g) const {  // a hint: past the end is harmless
    _mm_prefetch(reinterpret_cast<const char*>(w + n * (K / 2) + g * 16), _MM_HINT_T0);
  }
  inline __m256i load(int64_t n, int64_t g) const { return split16(w + n * (K / 2) + g * 16); }
  inline float scale(int64_t n, int64_t g) const { return sz[n * 2 * (K / G) + g]; }
  // groups 2p and 2p + 1 of output n: their low nibbles (lo) and high nibbles (hi), each 128-bit half one
  // group, and their two scales, lanes 0-3 and 4-7. J: p % 4 where the loop knows it (Q5 below), else 0.
  template <int J>
  inline void load_pair(int64_t n, int64_t p, __m256i& lo, __m256i& hi) const {
    split32(w + n * (K / 2) + p * 32, lo, hi);
  }
  inline __m256 scale_pair(int64_t n, int64_t p) const { return two_scales(sz + n * 2 * (K / G) + 2 * p); }
  inline float finish(float v, int64_t n, const QRows& x, int64_t m) const {
    const int64_t ng = K / G;
    return v + dot(sz + n * 2 * ng, x.aux + m * 2 * ng, 2 * ng);
  }
};

// int8 output n: (N, K) int8 in -127..127 and one float32 scale per output, applied to the finished sum.
struct Int8 {
  static constexpr bool kSigned = true;
  static constexpr bool kPairs = false;
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

// int8 per group output n: (N, K) int8 and one float32 scale per output and group of 32 columns (N, K/G),
// GGUF's Q8_0 and Q5_0 blocks (w = d q) as they are: each group's integer sum scaled by d times the
// activations' scale.
struct Int8G : Int8 {  // Int8's weights; s holds (N, K/G) scales
  inline float scale(int64_t n, int64_t g) const { return s[n * (K / G) + g]; }
  inline float finish(float v, int64_t, const QRows&, int64_t) const { return v; }
};

// GGUF Q5_0 output n, w = (q - 16) d with q in 0..31, kept exactly in 5 bits a weight plus a float32 d per
// 32 columns. The kernel's vectors of a row are numbered v = 2p (pair p's low nibbles, as Int4 unpacks
// them: same activation order), 2p + 1 (its high ones) and 2 * K/64 (a last unpaired group). A row of w
// is chunks of 160 bytes, one per four pairs: a 32-byte plane whose bit v % 8 of byte b is the fifth bit
// of byte b of vector v, then the four pairs' nibbles in Int4's layout (the last chunk shorter;
// models/q5.py packs them). One stream per row: planes at the end of the row, a second stream, measured
// 1.2-1.5x slower. A vector's fifth bits are one shift, one mask and one or of its plane, where expanding 32
// packed bits to bytes takes a shuffle, a compare and two masks. The -16 is Int4's -8 offset term twice
// (aux holds -8 d sum(xq) per group): sum(w x) = d dx sum(q xq) - 16 d dx sum(xq).
struct Q5 : Int4 {
  static constexpr bool kPlanes = true;
  const float* d;  // (N, K/G)
  int64_t stride;  // bytes a row
  static constexpr int64_t CHUNK = 160;
  inline const uint8_t* nibbles(int64_t n, int64_t p) const {  // pair p's 32 bytes (a last group's 16)
    return w + n * stride + (p / 4) * CHUNK + 32 + (p % 4) * 32;
  }
  inline __m256i plane(int64_t n, int64_t p) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * stride + (p / 4) * CHUNK));
  }
  inline void prefetch(int64_t n, int64_t g) const {
    _mm_prefetch(reinterpret_cast<const char*>(nibbles(n, g / 2)), _MM_HINT_T0);
  }
  // bit k of each byte of pl moved to bit 4 and or-ed into x. k is known when compiled (the tile's pair
  // loop is unrolled by four for Q5), so the shift is an immediate: no branch, no count register.
  template <int k>
  static inline __m256i fifth(__m256i pl, __m256i x) {
    const __m256i at4 = k < 4 ? _mm256_slli_epi16(pl, (4 - k) & 7) : _mm256_srli_epi16(pl, (k - 4) & 7);
    return _mm256_or_si256(x, _mm256_and_si256(at4, _mm256_set1_epi8(16)));
  }
  inline __m256i load(int64_t n, int64_t g) const {  // the last, unpaired group: pair np's place
    const int64_t np = g / 2;
    const __m256i x = split16(nibbles(n, np)), pl = plane(n, np);
    switch (np % 4) {  // vector 2 np: bit 0, 2, 4 or 6
      case 0: return fifth<0>(pl, x);
      case 1: return fifth<2>(pl, x);
      case 2: return fifth<4>(pl, x);
      default: return fifth<6>(pl, x);
    }
  }
  inline float scale(int64_t n, int64_t g) const { return d[n * (K / G) + g]; }
  template <int J>  // J = p % 4: vectors 2p and 2p + 1 are bits 2J and 2J + 1 of their plane
  inline void load_pair(int64_t n, int64_t p, __m256i& lo, __m256i& hi) const {
    split32(nibbles(n, p), lo, hi);
    const __m256i pl = plane(n, p);
    lo = fifth<2 * J>(pl, lo);
    hi = fifth<2 * J + 1>(pl, hi);
  }
  inline __m256 scale_pair(int64_t n, int64_t p) const { return two_scales(d + n * (K / G) + 2 * p); }
  inline float finish(float v, int64_t n, const QRows& x, int64_t m) const {
    const int64_t ng = K / G;
    return v + 2.f * dot(d + n * ng, x.aux + m * 2 * ng, ng);
  }
};

// bytes of bit planes a Q5 row of K columns carries
inline int64_t q5_plane_bytes(int64_t K) {
  const int64_t vectors = 2 * (K / 64) + (K / G) % 2;
  return (vectors + 7) / 8 * 32;
}

// NT outputs from n0 x RT rows from m0. A tile loads each output's group once for all RT rows.
template <int NT, int RT, class W>
inline void tile(const W& wt, const QRows& x, float* y, int64_t N, int64_t n0, int64_t m0) {
  const int64_t K = x.K, ng = K / G;
  __m256 acc[NT][RT];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) acc[t][r] = _mm256_setzero_ps();
  int64_t g0 = 0;
  if constexpr (W::kPairs) {
    const int64_t np = ng / 2;
    auto pair = [&](int64_t p, auto j) {  // j: std::integral_constant<int, p % 4> for Q5, 0 for int4
      for (int t = 0; t < NT; ++t) {
        wt.prefetch(n0 + t, 2 * p + 8);
        __m256i lo, hi;
        wt.template load_pair<decltype(j)::value>(n0 + t, p, lo, hi);
        const __m256 sv = wt.scale_pair(n0 + t, p);
        for (int r = 0; r < RT; ++r) {
          const int8_t* xq = x.q + (m0 + r) * K + p * 64;
          // |pairs| <= 2 * 31 * 127 (int4: 15; Q5: 31), two of them summed < 2^15: no saturation
          const __m256i s32 = dot4x2(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)), hi,
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
          const __m256 sd = _mm256_mul_ps(sv, _mm256_loadu_ps(x.d8 + (m0 + r) * np * 8 + p * 8));
          acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), sd, acc[t][r]);
        }
      }
    };
    using std::integral_constant;
    int64_t p = 0;
    if constexpr (W::kPlanes) {  // Q5: p % 4 known when compiled (its plane bits)
      for (; p + 4 <= np; p += 4) {
        pair(p, integral_constant<int, 0>{});
        pair(p + 1, integral_constant<int, 1>{});
        pair(p + 2, integral_constant<int, 2>{});
        pair(p + 3, integral_constant<int, 3>{});
      }
      if (p < np) pair(p, integral_constant<int, 0>{});
      if (p + 1 < np) pair(p + 1, integral_constant<int, 1>{});
      if (p + 2 < np) pair(p + 2, integral_constant<int, 2>{});
    } else {
      for (; p < np; ++p) pair(p, integral_constant<int, 0>{});
    }
    g0 = np * 2;
  }
  for (int64_t g = g0; g < ng; ++g) {
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
        const __m256i p = dot4(uw, xq);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * x.d[(m0 + r) * ng + g]), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < RT; ++r) y[(m0 + r) * N + n0 + t] = wt.finish(hsum(acc[t][r]), n0 + t, x, m0 + r);
}

// Rows per full tile: each output's weights are unpacked once for this many rows. Builds with AVX512VL
// have 32 vector registers, room for 16 rows' accumulators beside the weights; AVX2 has 16, room for 8.
#ifdef __AVX512VL__
constexpr int TILE_ROWS = 16;
#else
constexpr int TILE_ROWS = 8;
#endif

// Rows [m, m + R) of outputs [n, n + 4), R < TILE_ROWS: enough accumulator chains in flight to hide an
// FMA's latency, within the vector registers.
template <int R, class W>
inline void rest(const W& wt, const QRows& x, float* y, int64_t N, int64_t n, int64_t m) {
  if constexpr (R <= 2 && W::kSigned) {
    tile<4, R>(wt, x, y, N, n, m);
  } else if constexpr (R <= 2) {  // int4: one output at a time streams faster (8960 x 1536: 1.65 vs 2.35 ms)
    for (int t = 0; t < 4; ++t) tile<1, R>(wt, x, y, N, n + t, m);
  } else if constexpr (R <= 4 && !W::kPairs) {  // int4 pairs hold three vectors an output: one at a time
    for (int t = 0; t < 4; t += 2) tile<2, R>(wt, x, y, N, n + t, m);
  } else {
    for (int t = 0; t < 4; ++t) tile<1, R>(wt, x, y, N, n + t, m);
  }
}

// rest<R> for the R < TILE_ROWS known only at run time
template <class W, int R = 1>
inline void rest_of(int64_t left, const W& wt, const QRows& x, float* y, int64_t N, int64_t n, int64_t m) {
  if constexpr (R < TILE_ROWS) {
    if (left == R) return rest<R>(wt, x, y, N, n, m);
    rest_of<W, R + 1>(left, wt, x, y, N, n, m);
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
      for (; m + TILE_ROWS <= ce; m += TILE_ROWS)
        for (int t = 0; t < 4; ++t) tile<1, TILE_ROWS>(wt, x, y, N, n + t, m);
      if (m < ce) rest_of(ce - m, wt, x, y, N, n, m);
    }
  }
}

template <class W>
torch::Tensor matmul(const W& wt, const torch::Tensor& x, int64_t N, bool int4) {
  const int64_t M = x.size(0), K = x.size(1), ng = K / G;
  auto q = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto d = torch::empty({M, ng}, x.options());
  auto aux = int4 ? torch::empty({M, 2, ng}, x.options()) : torch::Tensor();
  auto d8 = int4 ? torch::empty({M * (ng / 2) * 8 + 1}, x.options()) : torch::Tensor();
  float* d8p = int4 ? d8.data_ptr<float>() : nullptr;
  quantize(x.data_ptr<float>(), q.data_ptr<int8_t>(), d.data_ptr<float>(), int4 ? aux.data_ptr<float>() : nullptr,
           d8p, M, K, int4);
  const QRows xr{q.data_ptr<int8_t>(), d.data_ptr<float>(), int4 ? aux.data_ptr<float>() : nullptr, K, d8p};
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  // threads take whole groups of 4 outputs (N is a multiple of 4), never part of a sum
  at::parallel_for(0, N / 4, 16, [&](int64_t b, int64_t e) { run(wt, xr, yp, M, N, b * 4, e * 4); });
  return y;
}

// ------------------------------------------------------------------------------- k-quant super-blocks
// Weights kept in GGUF's k-quant super-blocks (llama.cpp's Q4_K and Q6_K), 256 input columns each, as the
// file has them. A super-block's products stay integer: maddubs (unsigned weight levels x int8
// activations into int16 pairs), madd with an integer scale into int32, added over the super-block,
// converted and scaled once. That is half the vector work per row of the per-32 path above, and fewer
// bytes read (Q4_K 4.5 bits a weight, not 6; Q6_K 6.56, not 8).
//
// The activations: one float scale u per 256 columns (as llama.cpp's Q8_K) would round a 32-column group
// of small values as coarsely as the super-block's largest (measured on Qwen2.5-Coder-1.5B: twice the
// matmul error of a scale per 32). So each group g also gets an integer sub-scale s_g in 1..31, its
// values quantised against u s_g (u = the super-block's max |x| / (127 * 31), s_g = ceil(31 max|x_g| /
// max|x|)), and s_g joins the weight's integer scale in the madd (sc s_g <= 128 * 31 fits int16). The
// sums stay integer; the precision is close to a float scale per 32 columns.
// Each output and row takes one fixed sequence of operations at every row count.
constexpr int SB = 256;  // columns per super-block
constexpr int SUBS = 31;  // the largest activation sub-scale

struct KRows {  // rows quantised per super-block
  const int8_t* q;   // (M, K) int8
  const float* u;    // (M, K/SB) the super-block's unit
  const int16_t* s;  // (M, K/span) the sub-scale of each span's group of 32 (repeated for spans of 16)
  const int16_t* bs;  // (M, K/span) the span's sum of q, |.| <= 32 * 127
  int64_t K;
  const float* ms;  // Q4_K: (M, K/32) each group's u s_g sum(q)_g, the factor of its min term
};

void quantize_k(const float* x, int8_t* q, float* u, int16_t* sub, int16_t* bs, float* ms, int64_t M, int64_t K,
                int span) {
  const int64_t nb = K / SB;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xs = x + m * K + b * SB;
      float gmax[SB / G], amax = 0.f;
      for (int g = 0; g < SB / G; ++g) {
        gmax[g] = 0.f;
        for (int j = g * G; j < (g + 1) * G; ++j) gmax[g] = std::max(gmax[g], std::fabs(xs[j]));
        amax = std::max(amax, gmax[g]);
      }
      const float unit = amax / (127.f * SUBS), r = amax > 0.f ? SUBS / amax : 0.f;
      u[m * nb + b] = unit;
      int8_t* qs = q + m * K + b * SB;
      for (int g = 0; g < SB / G; ++g) {
        const int16_t sg = static_cast<int16_t>(std::min(SUBS, std::max(1, static_cast<int>(std::ceil(gmax[g] * r)))));
        const float dg = unit * sg, inv = dg > 0.f ? 1.f / dg : 0.f;
        for (int h = 0; h < G / span; ++h) {
          int32_t sum = 0;
          for (int j = g * G + h * span; j < g * G + (h + 1) * span; ++j) {
            const int32_t t = std::min(127, std::max(-127, static_cast<int32_t>(std::nearbyint(xs[j] * inv))));
            qs[j] = static_cast<int8_t>(t);
            sum += t;
          }
          const int64_t at = m * (K / span) + (b * SB + g * G) / span + h;
          bs[at] = static_cast<int16_t>(sum);
          sub[at] = sg;
          if (ms) ms[m * (K / G) + (b * SB) / G + g] = unit * static_cast<float>(sg * sum);
        }
      }
    }
}

// vpshufb pattern: every int16 lane of the low 128 bits <- int16 lane a, of the high 128 bits <- lane b
inline __m256i pick16(int a, int b) {
  return _mm256_setr_m128i(_mm_set1_epi16(static_cast<int16_t>(((2 * a + 1) << 8) | (2 * a))),
                           _mm_set1_epi16(static_cast<int16_t>(((2 * b + 1) << 8) | (2 * b))));
}

// isum + int32 lanes of sum scale * w * x; VPDPWSSD fuses the madd and the add where the build has
// AVX512-VNNI (the same integers: both wrap nowhere here)
inline __m256i add_dot32(__m256i isum, __m256i w, const int8_t* xq, __m256i scale) {
  // |pairs| <= 2 * 63 * 127 < 2^15: maddubs never saturates
  const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
#ifdef __AVX512VNNI__
  return _mm256_dpwssd_epi32(isum, p, scale);
#else
  return _mm256_add_epi32(isum, _mm256_madd_epi16(p, scale));
#endif
}

// Q4_K: 144 bytes: d and dmin (float16), 12 bytes packing eight 6-bit scales sc and mins m, then 128 bytes
// of nibbles (sub-block 2c in the low nibbles of bytes 32c..32c+31, 2c + 1 in their high ones);
// w = d sc_j q - dmin m_j. Sum: d dx sum_j sc_j (q . xq)_j - dmin dx sum_j m_j sum(xq)_j.
struct Q4K {
  static constexpr int64_t kBytes = 144;
  static constexpr int kSpan = 32;
  // the 8 scales (bytes 0-7) and mins (8-15) from their 12 packed bytes at p: j < 4 are the low 6 bits of
  // bytes j / j + 4; j >= 4 take 4 bits of byte j + 4 and the top 2 bits of byte j - 4 / j (gguf's
  // get_scale_min). On the three 32-bit words u0 u1 u2, four fields a word: the output words are
  // u0 & 0x3f.., (u2 & 0x0f..) | top2(u0), u1 & 0x3f.., (u2 >> 4 & 0x0f..) | top2(u1), where top2(w) =
  // (w >> 2) & 0x30.. puts each byte's top 2 bits at bits 4-5. In vector lanes: a scalar unpack through
  // memory cost ~10% of a 1-row matmul (measured on Qwen2.5-Coder-1.5B's ffn_gate|up).
  static inline __m128i scales_mins(const uint8_t* p) {
    const __m128i u = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));  // u0 u1 u2, then 4 unused bytes
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0)), 2),
                                      _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(low, top);
  }
  // rows m0.. of one output's super-block at blk into isum (int32 lanes) and mins (float32 lanes)
  template <int RT>
  static inline void block(const uint8_t* blk, float dmin, const KRows& x, int64_t m0, int64_t b, __m256i* isum,
                           __m256* mins) {
    const int64_t K = x.K, ns = K / kSpan;
    const __m128i sm = scales_mins(blk + 4);
    const __m128i sc = _mm_cvtepu8_epi16(sm);
    const __m256i mn = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(sm, sm));
    __m256i scs[RT];  // per row: sc_j s_j, both 128-bit halves
    for (int r = 0; r < RT; ++r) {
      const __m128i sub = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.s + (m0 + r) * ns + b * (SB / kSpan)));
      scs[r] = _mm256_broadcastsi128_si256(_mm_mullo_epi16(sc, sub));
    }
    for (int c = 0; c < 4; ++c) {
      __m256i lo, hi;
      split32(blk + 16 + 32 * c, lo, hi);
      for (int r = 0; r < RT; ++r) {
        const int8_t* xq = x.q + (m0 + r) * K + b * SB + 64 * c;
        isum[r] = add_dot32(isum[r], lo, xq, _mm256_shuffle_epi8(scs[r], pick16(2 * c, 2 * c)));
        isum[r] = add_dot32(isum[r], hi, xq + 32, _mm256_shuffle_epi8(scs[r], pick16(2 * c + 1, 2 * c + 1)));
      }
    }
    // dmin sum_j m_j (u s_j sum(xq)_j): the rows' factors came with their quantisation, the block's
    // dmin m_j once for all rows (three operations a row instead of eight with int32 products)
    const __m256 mf = _mm256_mul_ps(_mm256_cvtepi32_ps(mn), _mm256_set1_ps(dmin));
    for (int r = 0; r < RT; ++r)
      mins[r] = _mm256_fmadd_ps(mf, _mm256_loadu_ps(x.ms + (m0 + r) * (K / G) + b * (SB / G)), mins[r]);
  }
};

// Q6_K: 210 bytes: 128 bytes of low 4 bits ql, 64 of high 2 bits qh, 16 int8 scales (one per 16 columns),
// d (float16); half h (128 columns) takes ql[64h..], qh[32h..]; its 32-column quarters i = 0..3 are
// ql[64h + 32(i%2)..] low (i < 2) or high nibbles, over bits 2i..2i+1 of qh; w = d sc_j (q - 32).
// Sum: d dx (sum_j sc_j (q . xq)_j - 32 sum_j sc_j sum(xq)_j).
struct Q6K {
  static constexpr int64_t kBytes = 210;
  static constexpr int kSpan = 16;
  template <int RT>
  static inline void block(const uint8_t* blk, float, const KRows& x, int64_t m0, int64_t b, __m256i* isum, __m256*) {
    const int64_t K = x.K, ns = K / kSpan;
    const __m256i low4 = _mm256_set1_epi8(15), bits45 = _mm256_set1_epi8(0x30);
    const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    __m256i scs[RT];  // per row: sc_j s_j for the 16 spans (|.| <= 128 * 31)
    for (int r = 0; r < RT; ++r) {
      const int64_t at = (m0 + r) * ns + b * (SB / kSpan);
      scs[r] = _mm256_mullo_epi16(sc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.s + at)));
      // the -32 offset: 32 sum_j sc_j s_j sum(xq)_j, in the same int32 lanes
      const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.bs + at));
      isum[r] = _mm256_sub_epi32(isum[r], _mm256_slli_epi32(_mm256_madd_epi16(scs[r], bs), 5));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
      // the 16-bit shifts move bits across bytes; the masks keep only each byte's own
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), bits45)),
          _mm256_or_si256(_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), bits45)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(hb, bits45)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4), _mm256_and_si256(_mm256_srli_epi16(hb, 2), bits45))};
      for (int r = 0; r < RT; ++r) {
        const __m256i half = h ? _mm256_permute4x64_epi64(scs[r], 0xEE)  // this half's 8 spans, twice
                               : _mm256_permute4x64_epi64(scs[r], 0x44);
        for (int i = 0; i < 4; ++i)
          isum[r] = add_dot32(isum[r], q[i], x.q + (m0 + r) * K + b * SB + 128 * h + 32 * i,
                              _mm256_shuffle_epi8(half, pick16(2 * i, 2 * i + 1)));
      }
    }
  }
};

// One output n x RT rows from m0; dd (N, K/SB, 2) float32: each super-block's d and dmin (Q6_K: d, 0).
// One output at a time streams fastest here even at one row (measured against 2 and 4 interleaved outputs
// on Qwen2.5-Coder-1.5B's 8960 x 1536 Q4_K: 1.16 / 1.38 / 1.48 ms).
template <class B, int RT>
inline void tile_k(const uint8_t* w, const float* dd, const KRows& x, float* y, int64_t N, int64_t n, int64_t m0) {
  const int64_t nb = x.K / SB;
  const uint8_t* row = w + n * nb * B::kBytes;
  __m256 acc[RT], mins[RT];
  for (int r = 0; r < RT; ++r) {
    acc[r] = _mm256_setzero_ps();
    mins[r] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * B::kBytes;
    for (int64_t at = 4 * B::kBytes; at < 5 * B::kBytes; at += 64)  // the hardware prefetcher alone lags
      _mm_prefetch(reinterpret_cast<const char*>(blk + at), _MM_HINT_T0);
    __m256i isum[RT];
    for (int r = 0; r < RT; ++r) isum[r] = _mm256_setzero_si256();
    const float d = dd[(n * nb + b) * 2], dmin = dd[(n * nb + b) * 2 + 1];
    B::template block<RT>(blk, dmin, x, m0, b, isum, mins);
    for (int r = 0; r < RT; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * x.u[(m0 + r) * nb + b]), acc[r]);
  }
  for (int r = 0; r < RT; ++r) y[(m0 + r) * N + n] = hsum(acc[r]) - hsum(mins[r]);
}

// Outputs [n0, n1) for all M rows: rows in chunks whose activations stay in cache, 8 rows at a time (their
// int32 sums live in registers), each output's super-block serving all of them.
template <class B>
void run_k(const uint8_t* w, const float* dd, const KRows& x, float* y, int64_t M, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t CHUNK = 64;
  for (int64_t c = 0; c < M; c += CHUNK) {
    const int64_t ce = std::min(M, c + CHUNK);
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = c;
      for (; m + 8 <= ce; m += 8) tile_k<B, 8>(w, dd, x, y, N, n, m);
      switch (ce - m) {
        case 1: tile_k<B, 1>(w, dd, x, y, N, n, m); break;
        case 2: tile_k<B, 2>(w, dd, x, y, N, n, m); break;
        case 3: tile_k<B, 3>(w, dd, x, y, N, n, m); break;
        case 4: tile_k<B, 4>(w, dd, x, y, N, n, m); break;
        case 5: tile_k<B, 5>(w, dd, x, y, N, n, m); break;
        case 6: tile_k<B, 6>(w, dd, x, y, N, n, m); break;
        case 7: tile_k<B, 7>(w, dd, x, y, N, n, m); break;
        default: break;
      }
    }
  }
}

template <class B>
torch::Tensor kquant_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dd) {
  const int64_t N = w.size(0), K = w.size(1) / B::kBytes * SB;
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.dim() == 2 && w.is_contiguous() && w.size(1) % B::kBytes == 0,
              "bad k-quant weight: (N, K / 256 * ", B::kBytes, ") contiguous uint8 expected");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) CPU tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(dd.scalar_type() == torch::kFloat && dd.is_contiguous() && dd.dim() == 3 && dd.size(0) == N &&
              dd.size(1) == K / SB && dd.size(2) == 2, "bad k-quant scales: (N, K / 256, 2) float32 expected");
  const int64_t M = x.size(0);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto u = torch::empty({M, K / SB}, x.options());
  torch::Tensor sub = torch::empty({M, K / B::kSpan}, x.options().dtype(torch::kShort));
  torch::Tensor bs = torch::empty({M, K / B::kSpan}, x.options().dtype(torch::kShort));
  torch::Tensor ms = B::kSpan == G ? torch::empty({M, K / G}, x.options()) : torch::Tensor();
  float* msp = B::kSpan == G ? ms.data_ptr<float>() : nullptr;
  quantize_k(x.data_ptr<float>(), q.data_ptr<int8_t>(), u.data_ptr<float>(), sub.data_ptr<int16_t>(),
             bs.data_ptr<int16_t>(), msp, M, K, B::kSpan);
  const KRows xr{q.data_ptr<int8_t>(), u.data_ptr<float>(), sub.data_ptr<int16_t>(), bs.data_ptr<int16_t>(), K, msp};
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* dp = dd.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // threads take whole outputs, never part of a sum
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) { run_k<B>(wp, dp, xr, yp, M, N, b, e); });
  return y;
}

// w (R, nb bytes) k-quant super-blocks of ``bits`` (4: Q4_K, 6: Q6_K), dd (R, nb, 2) each block's d and
// dmin as float32 -> (R, nb 256) float32 weights: gguf's values with models/kquants.py's order of
// operations (Q4_K (d sc) q + (-(dmin m)), Q6_K (d sc) (q - 32), each step rounded to float32). What
// re-scoring reads for a handful of head rows: ~20 torch ops on a few rows took ~1 ms.
torch::Tensor kquant_values(const torch::Tensor& w, const torch::Tensor& dd, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 6, "bits must be 4 (Q4_K) or 6 (Q6_K), got ", bits);
  const int64_t bytes = bits == 4 ? Q4K::kBytes : Q6K::kBytes;
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.dim() == 2 && w.is_contiguous() && w.size(1) % bytes == 0,
              "bad k-quant weight: (R, K / 256 * ", bytes, ") contiguous uint8 expected");
  const int64_t R = w.size(0), nb = w.size(1) / bytes;
  TORCH_CHECK(dd.scalar_type() == torch::kFloat && dd.is_contiguous() && dd.numel() == R * nb * 2,
              "bad k-quant scales: (R, K / 256, 2) float32 expected");
  auto out = torch::empty({R, nb * SB}, dd.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* dp = dd.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb * nb; i < re * nb; ++i) {
      const uint8_t* blk = wp + i * bytes;
      const float d = dp[2 * i], dmin = dp[2 * i + 1];
      float* o = op + i * SB;
      if (bits == 4) {
        alignas(16) uint8_t sm[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(sm), Q4K::scales_mins(blk + 4));
        for (int j = 0; j < 8; ++j) {
          const float sc = d * static_cast<float>(sm[j]), mn = -(dmin * static_cast<float>(sm[8 + j]));
          const uint8_t* q = blk + 16 + 32 * (j / 2);
          for (int l = 0; l < 32; ++l) o[32 * j + l] = static_cast<float>(j % 2 ? q[l] >> 4 : q[l] & 15) * sc + mn;
        }
      } else {
        for (int h = 0; h < 2; ++h)
          for (int qt = 0; qt < 4; ++qt)
            for (int l = 0; l < 32; ++l) {
              const uint8_t ql = blk[64 * h + 32 * (qt % 2) + l];
              const int hb = (blk[128 + 32 * h + l] >> (2 * qt)) & 3;
              const int at = 128 * h + 32 * qt + l;
              const float sc = d * static_cast<float>(static_cast<int8_t>(blk[192 + at / 16]));
              o[at] = sc * static_cast<float>(((qt < 2 ? ql & 15 : ql >> 4) | (hb << 4)) - 32);
            }
      }
    }
  });
  return out;
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

// x (M, K) float32, w (N, K/2 + planes) uint8 Q5_0 levels (Q5 above), d (N, K/32) float32 -> (M, N)
torch::Tensor q5_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d) {
  const int64_t N = w.size(0), K = x.size(1);
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.is_contiguous() && w.dim() == 2 && N % 4 == 0 &&
              w.size(1) == K / 2 + q5_plane_bytes(K), "bad Q5 weight");
  TORCH_CHECK(d.scalar_type() == torch::kFloat && d.is_contiguous() && d.dim() == 2 && d.size(0) == N &&
              d.size(1) == K / G, "bad Q5 scales");
  Q5 wt;
  wt.w = w.data_ptr<uint8_t>();
  wt.sz = nullptr;
  wt.K = K;
  wt.d = d.data_ptr<float>();
  wt.stride = w.size(1);
  return matmul(wt, x, N, true);
}

// x (M, K) float32, w (N, K/256 * 144) uint8 Q4_K super-blocks, dd (N, K/256, 2) float32 d, dmin -> (M, N)
torch::Tensor q4k_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dd) {
  return kquant_mm<Q4K>(x, w, dd);
}

// x (M, K) float32, w (N, K/256 * 210) uint8 Q6_K super-blocks, dd (N, K/256, 2) float32 d, 0 -> (M, N)
torch::Tensor q6k_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dd) {
  return kquant_mm<Q6K>(x, w, dd);
}

// x (M, K) float32, w (N, K) int8, scale (N,) float32 -> (M, N): (x . q_n) * scale_n; or scale (N, K/32)
// float32, one per output and group: sum over groups of scale_ng (x_g . q_ng)
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  const int64_t N = w.size(0), K = w.size(1);
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kChar && w.is_contiguous() && N % 4 == 0, "bad int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous(), "bad int8 scales");
  if (scale.dim() == 2) {
    TORCH_CHECK(scale.size(0) == N && scale.size(1) == K / G, "bad int8 group scales");
    return matmul(Int8G{{w.data_ptr<int8_t>(), scale.data_ptr<float>(), K}}, x, N, false);
  }
  TORCH_CHECK(scale.numel() == N, "bad int8 scales");
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

// q . k for four keys at once: each key's sum is dot()'s sequence of operations, four independent chains
// in flight instead of one waiting on its own FMA latency.
inline void dot4(const float* q, const float* k0, const float* k1, const float* k2, const float* k3, int64_t n,
                 float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
  }
  out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
  for (; i < n; ++i)
    for (int j = 0; j < 4; ++j) out[j] = std::fma(q[i], (j == 0 ? k0 : j == 1 ? k1 : j == 2 ? k2 : k3)[i], out[j]);
}

// One query head against its keys: softmax(q . k_j * scale) . v_j over j = 0..len-1 in the order given.
// Every output lane sums its keys in that order; the loops only choose which independent sums run
// together (four keys' dot products, eight 8-lane blocks of the output), so the bits do not depend on it.
void attend_one(const float* q, const float* kp, const float* vp, const int64_t* idx, int64_t len, int64_t row,
                int64_t hd, float scale, float* sc, float* out) {
  int64_t j = 0;
  for (; j + 4 <= len; j += 4)
    dot4(q, kp + idx[j] * row, kp + idx[j + 1] * row, kp + idx[j + 2] * row, kp + idx[j + 3] * row, hd, sc + j);
  for (; j < len; ++j) sc[j] = dot(q, kp + idx[j] * row, hd);
  float mx = -INFINITY;
  for (j = 0; j < len; ++j) {
    sc[j] *= scale;
    mx = std::max(mx, sc[j]);
  }
  const __m256 m = _mm256_set1_ps(mx);
  j = 0;
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
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  constexpr int B = 8;  // 8-lane output blocks summed together: 8 accumulators, the key's row read once
  int64_t d = 0;
  for (; d + 8 * B <= hd; d += 8 * B) {
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const __m256 w = _mm256_set1_ps(sc[t]);
      const float* v = vp + idx[t] * row + d;
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * b), acc[b]);
    }
    for (int b = 0; b < B; ++b) _mm256_storeu_ps(out + d + 8 * b, _mm256_mul_ps(acc[b], inv));
  }
  for (; d + 8 <= hd; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(sc[t]), _mm256_loadu_ps(vp + idx[t] * row + d), acc);
    _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, inv));
  }
  const float invs = 1.f / sum;
  for (; d < hd; ++d) {
    float acc = 0.f;
    for (int64_t t = 0; t < len; ++t) acc = std::fma(sc[t], vp[idx[t] * row + d], acc);
    out[d] = acc * invs;
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

// q|k|v (N, (H + 2 H_kv) hd) float32 of N fed positions, their RoPE rows cos, sin (N, hd) as full-width
// tables (cos | cos, -sin | sin), the K / V pools (S, H_kv, hd) and each position's pool row slots (N,):
// writes the rotated K and the V of position n into row slots[n] and returns the rotated Q (N, H, hd).
// Rotation is x cos + roll(x, hd / 2) sin, each product rounded and then their sum (built without FMA
// contraction): the bits of models/llama.py's three aten ops, in one call instead of eleven.
torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                         const torch::Tensor& k_pool, const torch::Tensor& v_pool, const torch::Tensor& slots,
                         int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == torch::kFloat && qkv.dim() == 2 && qkv.is_contiguous(),
              "qkv must be a contiguous float32 (N, (H + 2 H_kv) hd) CPU tensor");
  TORCH_CHECK(k_pool.scalar_type() == torch::kFloat && k_pool.dim() == 3 && k_pool.is_contiguous() &&
              v_pool.sizes() == k_pool.sizes() && v_pool.is_contiguous() && v_pool.scalar_type() == torch::kFloat,
              "k_pool and v_pool must be contiguous float32 (S, H_kv, hd)");
  const int64_t N = qkv.size(0), S = k_pool.size(0), hd = k_pool.size(2), half = hd / 2;
  TORCH_CHECK(k_pool.size(1) == kv_heads && hd % 2 == 0 && qkv.size(1) == (heads + 2 * kv_heads) * hd,
              "qkv has ", qkv.size(1), " columns, (", heads, " + 2 x ", kv_heads, ") heads of ", hd, " expected");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == N * hd && sin.numel() == N * hd, "cos, sin must be (N, hd) float32");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == N, "slots must be (N,) int64");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(sp[n] >= 0 && sp[n] < S, "slot ", sp[n], " outside the pool of ", S);
  auto q = torch::empty({N, heads, hd}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  const int64_t width = (heads + 2 * kv_heads) * hd, row = kv_heads * hd;
  auto rotate = [&](const float* x, const float* c, const float* s, float* out) {
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8) {  // roll: lane i reads x[(i + half) mod hd]; 8-lane blocks never straddle
      const float* xr = x + ((i + half) % hd);  // half a multiple of 8 here (checked below)
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(c + i)),
                                              _mm256_mul_ps(_mm256_loadu_ps(xr), _mm256_loadu_ps(s + i))));
    }
    for (; i < hd; ++i) out[i] = x[i] * c[i] + x[(i + half) % hd] * s[i];
  };
  const bool vec = half % 8 == 0;
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const float* x = xp + n * width;
      const float* c = cp + n * hd;
      const float* s = snp + n * hd;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        float* out = h < heads ? qp + (n * heads + h) * hd : kp + sp[n] * row + (h - heads) * hd;
        if (vec) {
          rotate(x + h * hd, c, s, out);
        } else {
          for (int64_t i = 0; i < hd; ++i) out[i] = x[h * hd + i] * c[i] + x[h * hd + (i + half) % hd] * s[i];
        }
      }
      std::memcpy(vp + sp[n] * row, x + (heads + kv_heads) * hd, row * sizeof(float));
    }
  });
  return q;
}

// x (N, 2F) float32, gate | up -> (N, F): silu(gate) up, silu(g) = g / (1 + exp(-g)) with exp8's exp, row by
// row in one fixed order. One call for aten's chunk, silu and mul.
torch::Tensor silu_mul(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous() &&
              x.size(1) % 2 == 0, "x must be a contiguous float32 (N, 2F) CPU tensor");
  const int64_t N = x.size(0), F = x.size(1) / 2;
  auto y = torch::empty({N, F}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    const __m256 one = _mm256_set1_ps(1.f), top = _mm256_set1_ps(88.f);  // exp(88) is finite in float32
    for (int64_t n = b; n < e; ++n) {
      const float* g = xp + n * 2 * F;
      const float* u = g + F;
      float* out = yp + n * F;
      int64_t i = 0;
      for (; i + 8 <= F; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 ex = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), top));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, ex)), _mm256_loadu_ps(u + i)));
      }
      for (; i < F; ++i) out[i] = g[i] / (1.f + exp1(std::min(-g[i], 88.f))) * u[i];
    }
  });
  return y;
}

// x (N, V) float32 -> (N,) int64: each row's first index of its largest value, NaN counting as the
// largest (aten's argmax). aten's CPU argmax took ~0.4 ms for a 151,936-id row, its amax 0.02.
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous() &&
              x.size(1) > 0, "x must be a contiguous float32 (N, V) CPU tensor with V >= 1");
  const int64_t N = x.size(0), V = x.size(1);
  auto out = torch::empty({N}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const float* r = xp + n * V;
      __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= V; i += 8) {
        const __m256 v = _mm256_loadu_ps(r + i);
        mx = _mm256_max_ps(mx, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, mx);
      float m = lanes[0];
      for (int j = 1; j < 8; ++j) m = std::max(m, lanes[j]);
      bool has_nan = _mm256_movemask_ps(nan) != 0;
      for (int64_t t = i; t < V; ++t) {
        has_nan = has_nan || std::isnan(r[t]);
        m = std::max(m, r[t]);
      }
      int64_t at = 0;
      if (has_nan) {
        while (!std::isnan(r[at])) ++at;
      } else {
        const __m256 mv = _mm256_set1_ps(m);
        int64_t j = 0;
        for (; j + 8 <= V; j += 8) {
          const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + j), mv, _CMP_EQ_OQ));
          if (hit) break;
        }
        at = j;
        while (r[at] != m) ++at;
      }
      op[n] = at;
    }
  });
  return out;
}

// ------------------------------------------------------------------------- int4 on AVX512-BF16
// The int8 path above pays, for every row, an integer product, a conversion and a float scale per group
// of 32 columns: a 5-row verification pass costs ~3x one row. On CPUs with AVX512-BF16 each output's
// group of 32 weights is instead expanded once to bfloat16 values w = (q - 8) s + z (one FMA per group
// for the 16 levels, rounded to bfloat16, then a 16-entry table lookup per column), and each row then
// costs one VDPBF16PS per group: 32 products into 16 float32 lanes. Activations are rounded to bfloat16
// once per call.
//
// Batch invariance: every (row, output) pair has its own accumulator, which takes the same sequence of
// VDPBF16PS over the groups and one fixed horizontal sum, whatever rows and outputs share its tile;
// threads split outputs, never a sum.
//
// Built where the compiler is told the CPU has AVX512-BF16 (kernels.cflags adds the flags on such
// CPUs); other builds have no such path (has_bf16() false) and Python keeps int4 on the int8 one.
#ifdef __AVX512BF16__
namespace bf16 {

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

}  // namespace bf16
#endif

bool has_bf16() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// x (M, K) float32, w (N, K/2) uint8 nibbles, sz (N, 2, K/32) float32 scales then zeros -> (M, N) float32;
// only on CPUs with AVX512-BF16
torch::Tensor int4_bf16_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz) {
  TORCH_CHECK(has_bf16(), "this build of the kernel has no AVX512-BF16 path (built for a CPU without it)");
  const int64_t N = w.size(0), K = w.size(1) * 2, M = x.size(0);
  check(x, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.is_contiguous() && N % 2 == 0, "bad int4 weight");
  TORCH_CHECK(sz.scalar_type() == torch::kFloat && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == N &&
              sz.size(1) == 2 && sz.size(2) == K / G, "bad int4 scales");
  auto y = torch::empty({M, N}, x.options());
#ifdef __AVX512BF16__
  auto xb = torch::empty({M, K}, x.options().dtype(torch::kBFloat16));
  uint16_t* xp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
  bf16::to_bf16(x.data_ptr<float>(), xp, M, K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sz.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // threads take whole pairs of outputs, never part of a sum
  at::parallel_for(0, N / bf16::NT, 16, [&](int64_t b, int64_t e) {
    bf16::run(wp, sp, xp, yp, M, K, N, b * bf16::NT, e * bf16::NT);
  });
#endif
  return y;
}

// ------------------------------------------------------------------------------- a whole decoder layer
// One Llama-style decoder layer in one call: what models/llama.py's LlamaDecoder.layer runs on these
// kernels (RMS norm, Q|K|V, RoPE with the K/V store, attention, O, residual, RMS norm, gate|up, SiLU x up,
// down, residual), the same functions in the same order, so the same bits, without the ~10 Python calls
// and their dispatch between them (about a quarter of a SmolLM2 int4 decode step went outside the kernels).
// Built once per layer; it holds its weights and K/V pools (references, not copies).
struct Part {
  int64_t kind;  // 0 int4 (Int4), 1 int8 (per row or per group), 2 Q4_K, 3 Q6_K, 4 Q5_0 (Q5)
  torch::Tensor w, s;
  std::optional<torch::Tensor> bias;
  // bf16: int4 on the AVX512-BF16 path (int4_bf16_mm) rather than the int8-activation one
  torch::Tensor operator()(const torch::Tensor& x, bool bf16) const {
    const torch::Tensor y = kind == 0   ? (bf16 ? int4_bf16_mm(x, w, s) : int4_mm(x, w, s))
                            : kind == 1 ? int8_mm(x, w, s)
                            : kind == 2 ? q4k_mm(x, w, s)
                            : kind == 3 ? q6k_mm(x, w, s)
                                        : q5_mm(x, w, s);
    return bias ? y + *bias : y;
  }
};

// One linear of the layer: its parts' outputs side by side. A GGUF Q|K|V whose parts are in different
// block types (V in Q6_K, Q and K in Q4_K on half of a Q4_K_M file's layers) is one part per block type,
// as quantize.py's StackedLinear runs it.
struct Matmul {
  std::vector<Part> parts;
  torch::Tensor operator()(const torch::Tensor& x, bool bf16) const {
    if (parts.size() == 1) return parts[0](x, bf16);
    std::vector<torch::Tensor> ys;
    for (const Part& p : parts) ys.push_back(p(x, bf16));
    return torch::cat(ys, -1);
  }
};

struct LayerPlan {
  torch::Tensor in_norm, post_norm, k_pool, v_pool;
  std::vector<Matmul> mm;  // Q|K|V, O, gate|up, down
  double eps, scale;
  int64_t heads, kv_heads;

  // parts: how many of the (kind, weight, scales, bias) entries each of the four linears has, in order
  LayerPlan(torch::Tensor in_norm, torch::Tensor post_norm, double eps, std::vector<int64_t> parts,
            std::vector<int64_t> kinds, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> scales,
            std::vector<std::optional<torch::Tensor>> biases, torch::Tensor k_pool, torch::Tensor v_pool, int64_t heads,
            int64_t kv_heads, double scale)
      : in_norm(in_norm), post_norm(post_norm), k_pool(k_pool), v_pool(v_pool), eps(eps), scale(scale), heads(heads),
        kv_heads(kv_heads) {
    TORCH_CHECK(parts.size() == 4, "a layer has four linears, not ", parts.size());
    const size_t n = kinds.size();
    TORCH_CHECK(weights.size() == n && scales.size() == n && biases.size() == n,
                "every part needs a kind, a weight, scales and a bias (or None)");
    size_t at = 0;
    for (int64_t count : parts) {
      TORCH_CHECK(count >= 1 && at + count <= n, "a linear of ", count, " parts where ", n - at, " entries are left");
      Matmul m;
      for (int64_t j = 0; j < count; ++j, ++at) {
        TORCH_CHECK(kinds[at] >= 0 && kinds[at] <= 4, "matmul kind ", kinds[at], " unknown");
        m.parts.push_back(Part{kinds[at], weights[at], scales[at], biases[at]});
      }
      mm.push_back(std::move(m));
    }
    TORCH_CHECK(at == n, n - at, " entries beyond the four linears' parts");
  }

  // x (N, D) float32 rows; cos, sin (N, hd) full-width RoPE rows; slots (N,) their K/V rows; idx, start,
  // len: what each row's attention reads (attention() above); bf16: int4 parts on the AVX512-BF16 path,
  // chosen per call as the op-by-op layer chooses it -> (N, D)
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& slots, const torch::Tensor& idx, const torch::Tensor& start,
                        const torch::Tensor& len, bool bf16) const {
    const torch::Tensor q =
        rope_store(mm[0](rms_norm(x, in_norm, eps), bf16), cos, sin, k_pool, v_pool, slots, heads, kv_heads);
    const torch::Tensor h = x + mm[1](attention(q, k_pool, v_pool, idx, start, len, scale), bf16);
    return h + mm[3](silu_mul(mm[2](rms_norm(h, post_norm, eps), bf16)), bf16);
  }
};

// Also as dispatcher ops (torch.ops.exitwise_lowbit.*), which torch.compile traces (their shapes are
// registered in Python); eager calls take the lighter pybind entry points below.
TORCH_LIBRARY(exitwise_lowbit, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor sz) -> Tensor");
  m.def("int4_bf16_mm(Tensor x, Tensor w, Tensor sz) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("q4k_mm(Tensor x, Tensor w, Tensor dd) -> Tensor");
  m.def("q6k_mm(Tensor x, Tensor w, Tensor dd) -> Tensor");
  m.def("q5_mm(Tensor x, Tensor w, Tensor d) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor idx, Tensor start, Tensor len, float scale) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, "
        "int heads, int kv_heads) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("kquant_values(Tensor w, Tensor dd, int bits) -> Tensor");
}
TORCH_LIBRARY_IMPL(exitwise_lowbit, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_bf16_mm", &int4_bf16_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("q4k_mm", &q4k_mm);
  m.impl("q6k_mm", &q6k_mm);
  m.impl("q5_mm", &q5_mm);
  m.impl("rms_norm", &rms_norm);
  m.impl("attention", &attention);
  m.impl("rope_store", &rope_store);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("kquant_values", &kquant_values);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4_mm, "int4 weight x int8-quantised activations, batch-invariant");
  m.def("int4_bf16_mm", &int4_bf16_mm, "int4 weight x bfloat16 activations (AVX512-BF16), batch-invariant");
  m.def("has_bf16", &has_bf16, "whether this build has the AVX512-BF16 int4 path");
  m.def("int8_mm", &int8_mm, "int8 weight x int8-quantised activations, batch-invariant");
  m.def("q4k_mm", &q4k_mm, "Q4_K super-block weight x int8-quantised activations, batch-invariant");
  m.def("q6k_mm", &q6k_mm, "Q6_K super-block weight x int8-quantised activations, batch-invariant");
  m.def("q5_mm", &q5_mm, "Q5_0 levels (nibbles + bit planes) x int8-quantised activations, batch-invariant");
  m.def("rms_norm", &rms_norm, "RMS norm of float32 rows in one call, batch-invariant");
  m.def("attention", &attention, "attention of each query over its own keys, batch-invariant");
  m.def("rope_store", &rope_store, "rotate Q and K, write K and V into their pools; the rotated Q");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate | up rows");
  m.def("argmax_rows", &argmax_rows, "each row's first index of its largest value (NaN largest)");
  m.def("kquant_values", &kquant_values, "k-quant super-blocks de-quantised to float32, gguf's values");
  // module_local: another build of this source in the process (benchmarks/kernels.py --baseline) has its own
  pybind11::class_<LayerPlan>(m, "LayerPlan", pybind11::module_local())
      .def(pybind11::init<torch::Tensor, torch::Tensor, double, std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<std::optional<torch::Tensor>>, torch::Tensor, torch::Tensor, int64_t, int64_t,
                          double>())
      .def("forward", &LayerPlan::forward, "the layer on x: (N, D) -> (N, D)");
}
