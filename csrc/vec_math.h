// Vector lane helpers of the CPU kernels: loads and stores that convert the stored dtype to the
// compute one, the widening of fp32 lanes to fp64 ones, and lane math cheaper than at::vec's where a
// kernel can give up what it does not need.
// exp_nonpositive: exp of x <= 0, cheaper than Vectorized::exp (Sleef's u10):
//   exp(x) = 2^n * exp(r),  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
//   exp(r) = 1 + r + r^2 q(r),  q a degree-4 fit to (exp(r) - 1 - r) / r^2: within 1.01 ulp in fp32
//   over every x <= 0 (checked exhaustively), subnormal results included
// tanh_lanes: tanh, cheaper than Vectorized::tanh (Sleef's u10: 5.6 ns a float here, against 0.3):
//   |u| < 0.55:  tanh(u) = u + u^3 P(u^2),  P a degree-4 fit to (tanh(u) - u) / u^3 (minimax in the
//                relative error of tanh; 0.82 ulp in fp32 on [0, 0.55])
//   else:        tanh(|u|) = (1 - e) / (1 + e),  e = exp(-2|u|) <= 1/3 (exp_nonpositive), u's sign
// fp32 lanes under AVX2 and AVX-512 (the same steps, 8 or 16 lanes); other types and builds use
// Vectorized::exp and Vectorized::tanh.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <type_traits>

namespace fusedops {

// n <= Vectorized<acc_t>::size() elements of scalar_t as a vector of acc_t, and back: a plain
// load or store where the types agree; fp16/bf16 <-> fp32 with at::vec's conversions for a whole
// vector; else lane by lane through a buffer.
template <typename acc_t, typename scalar_t>
inline at::vec::Vectorized<acc_t> load_acc(const scalar_t* p, int64_t n = at::vec::Vectorized<acc_t>::size()) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return Vec::loadu(p, n);
  } else {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t> && std::is_same_v<acc_t, float>) {
      if (n == Vec::size()) {
        Vec out;
        at::vec::load_to_float<scalar_t>(p, out);
        return out;
      }
    }
    alignas(64) acc_t buf[Vec::size()] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(buf);
  }
}

template <typename acc_t, typename scalar_t>
inline void store_acc(scalar_t* p, const at::vec::Vectorized<acc_t>& v,
                      int64_t n = at::vec::Vectorized<acc_t>::size()) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v.store(p, n);
  } else {
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t> && std::is_same_v<acc_t, float>) {
      if (n == Vec::size()) {
#if defined(CPU_CAPABILITY_AVX2)  // the 8 lanes rounded to 16 bits, stored as one 128-bit vector
        const __m128i packed =
            std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(v) : at::vec::cvtfp32_fp16(v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#elif defined(CPU_CAPABILITY_AVX512)  // the 16 lanes rounded to 16 bits, stored as one 256-bit vector
        const __m256i packed =
            std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(v) : at::vec::cvtfp32_fp16(v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#else  // v packed twice into one vector of 2n lanes: its first n are v's
        at::vec::convert_from_float<scalar_t>(v, v).store(p, Vec::size());
#endif
        return;
      }
    }
    alignas(64) acc_t buf[Vec::size()];
    v.store(buf);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

// store_acc of two whole vectors, a then b, to p: fp16/bf16 rounded in one conversion of both
template <typename acc_t, typename scalar_t>
inline void store_acc2(scalar_t* p, const at::vec::Vectorized<acc_t>& a, const at::vec::Vectorized<acc_t>& b) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t> && std::is_same_v<acc_t, float>) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  } else {
    store_acc<acc_t>(p, a);
    store_acc<acc_t>(p + at::vec::Vectorized<acc_t>::size(), b);
  }
}

// The lanes of a Vectorized<acc_t> as fp64 vectors, in order (exact): one vector for fp64, two for fp32.
template <typename acc_t>
using Fp64Lanes =
    std::array<at::vec::Vectorized<double>, at::vec::Vectorized<acc_t>::size() / at::vec::Vectorized<double>::size()>;

template <typename acc_t>
inline Fp64Lanes<acc_t> to_fp64(const at::vec::Vectorized<acc_t>& v) {
  using VecD = at::vec::Vectorized<double>;
  if constexpr (std::is_same_v<acc_t, double>) {
    return {v};
  } else {
    static_assert(at::vec::Vectorized<acc_t>::size() == 2 * VecD::size(), "fp32 lanes fill two fp64 vectors");
#if defined(CPU_CAPABILITY_AVX2)
    const __m256 x = v;
    return {VecD(_mm256_cvtps_pd(_mm256_castps256_ps128(x))), VecD(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)))};
#elif defined(CPU_CAPABILITY_AVX512)
    const __m512 x = v;
    return {VecD(_mm512_cvtps_pd(_mm512_castps512_ps256(x))), VecD(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)))};
#else
    alignas(64) acc_t in[2 * VecD::size()];
    alignas(64) double out[2 * VecD::size()];
    v.store(in);
    for (int64_t k = 0; k < 2 * VecD::size(); ++k) out[k] = static_cast<double>(in[k]);
    return {VecD::loadu(out), VecD::loadu(out + VecD::size())};
#endif
  }
}

// to_fp64(load_acc<acc_t>(p)): a whole vector of scalar_t from p as fp64 vectors; fp32 converted
// straight from memory, 4 lanes at a time (no shuffle between the halves)
template <typename acc_t, typename scalar_t>
inline Fp64Lanes<acc_t> load_fp64(const scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {at::vec::Vectorized<double>(_mm256_cvtps_pd(_mm_loadu_ps(p))),
            at::vec::Vectorized<double>(_mm256_cvtps_pd(_mm_loadu_ps(p + 4)))};
  }
#elif defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {at::vec::Vectorized<double>(_mm512_cvtps_pd(_mm256_loadu_ps(p))),
            at::vec::Vectorized<double>(_mm512_cvtps_pd(_mm256_loadu_ps(p + 8)))};
  }
#endif
  return to_fp64(load_acc<acc_t>(p));
}

template <typename T>
inline at::vec::Vectorized<T> exp_nonpositive(const at::vec::Vectorized<T>& x) {
  return x.exp();
}

template <typename T>
inline at::vec::Vectorized<T> tanh_lanes(const at::vec::Vectorized<T>& x) {
  return x.tanh();
}

// max(a, b) per lane; a NaN may or may not propagate (for callers whose result turns NaN anyway)
template <typename T>
inline at::vec::Vectorized<T> max_lanes(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}

#if defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> max_lanes(const at::vec::Vectorized<float>& a,
                                            const at::vec::Vectorized<float>& b) {
  return _mm256_max_ps(a, b);
}

// x <= 0 or NaN; x below -104 gives 0 (exp(-104) < 2^-150 rounds to 0), as -inf does.
template <>
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& x_) {
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x_);  // NaN lanes stay NaN (2nd operand)
  // n = round(x / ln 2) by adding 1.5 * 2^23 + 127: in [2^23, 2^24) floats are integers, so the
  // fma rounds to one, and the low mantissa bits of t hold n + 127, 2^n's exponent field
  const __m256 shifter = _mm256_set1_ps(12583039.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.4426950216293335f), shifter);
  const __m256 n = _mm256_sub_ps(t, shifter);
  // r = x - n ln2, ln2 = hi + lo: each fma rounds once and x - n*hi is nearly exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.6931471824645996f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-1.9046542121259336e-09f), r);
  __m256 q = _mm256_set1_ps(0.0013752655358985066f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.00836891308426857f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.041669510304927826f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.166665181517601f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.49999988079071045f));
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // p * 2^n: 2^n is t's bits shifted into the exponent field; below n = -126 (2^n subnormal) as
  // 2^n1 * 2^n2 with n1 = floor(n/2), both normal down to n = -150, so a subnormal result is
  // rounded once
  if (_mm256_movemask_ps(_mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_LT_OQ)) == 0) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }
  const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(shifter));
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// NaN lanes stay NaN (through exp_nonpositive); +-inf give +-1.
template <>
inline at::vec::Vectorized<float> tanh_lanes(const at::vec::Vectorized<float>& x) {
  const __m256 u = x, sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 a = _mm256_andnot_ps(sign, u);  // |u|
  const __m256 e = exp_nonpositive(at::vec::Vectorized<float>(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f))));
  const __m256 large = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)),
                                    _mm256_and_ps(sign, u));  // (1 - e) / (1 + e) with u's sign
  const __m256 s = _mm256_mul_ps(u, u);
  __m256 p = _mm256_set1_ps(-0.006274238228797913f);
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(0.021071678027510643f));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(-0.05385230854153633f));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(0.13332585990428925f));
  p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(-0.33333316445350647f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(u, s), p, u);  // u + u^3 P(u^2)
  return _mm256_blendv_ps(large, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.55f), _CMP_LT_OQ));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)  // the same functions, 16 lanes
template <>
inline at::vec::Vectorized<float> max_lanes(const at::vec::Vectorized<float>& a,
                                            const at::vec::Vectorized<float>& b) {
  return _mm512_max_ps(a, b);
}

// As the AVX2 one: the shifter's n = round(x / ln 2), r = x - n ln2 in two fmas, the same polynomial; p * 2^n
// by scalef, which rounds a subnormal result once (no split of n needed).
template <>
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& x_) {
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x_);  // NaN lanes stay NaN (2nd operand)
  const __m512 shifter = _mm512_set1_ps(12583039.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.4426950216293335f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.6931471824645996f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-1.9046542121259336e-09f), r);
  __m512 q = _mm512_set1_ps(0.0013752655358985066f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.00836891308426857f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.041669510304927826f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.166665181517601f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.49999988079071045f));
  const __m512 p = _mm512_add_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}

template <>
inline at::vec::Vectorized<float> tanh_lanes(const at::vec::Vectorized<float>& x) {
  const __m512 u = x, sign = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
  const __m512 a = _mm512_andnot_ps(sign, u);  // |u|
  const __m512 e = exp_nonpositive(at::vec::Vectorized<float>(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f))));
  const __m512 large = _mm512_or_ps(_mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e)),
                                    _mm512_and_ps(sign, u));  // (1 - e) / (1 + e) with u's sign
  const __m512 s = _mm512_mul_ps(u, u);
  __m512 p = _mm512_set1_ps(-0.006274238228797913f);
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.021071678027510643f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-0.05385230854153633f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(0.13332585990428925f));
  p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-0.33333316445350647f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(u, s), p, u);  // u + u^3 P(u^2)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.55f), _CMP_LT_OQ), large, small);
}
#endif

}  // namespace fusedops
