// Lane math cheaper than at::vec's where a kernel can give up what it does not need.
// exp_nonpositive: exp of x <= 0, cheaper than Vectorized::exp (Sleef's u10):
//   exp(x) = 2^n * exp(r),  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
//   exp(r) = 1 + r + r^2 q(r),  q a degree-4 fit to (exp(r) - 1 - r) / r^2: within 1 ulp in fp32
// fp32 lanes under AVX2 only; other types and builds use Vectorized::exp.
#pragma once
#include <ATen/cpu/vec/vec.h>

namespace fusedops {

template <typename T>
inline at::vec::Vectorized<T> exp_nonpositive(const at::vec::Vectorized<T>& x) {
  return x.exp();
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
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950216293335f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, ln2 = hi + lo: each fma rounds once and x - n*hi is nearly exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.6931471824645996f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-1.9046542121259336e-09f), r);
  __m256 q = _mm256_set1_ps(0.0013752655358985066f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.00836891308426857f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.041669510304927826f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.166665181517601f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.49999988079071045f));
  const __m256 p = _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // p * 2^n: 2^n built in the exponent bits; below n = -126 (2^n subnormal) as 2^n1 * 2^n2 with
  // n1 = floor(n/2), both normal down to n = -150, so a subnormal result is rounded once
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i bias = _mm256_set1_epi32(127);
  if (_mm256_movemask_ps(_mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_LT_OQ)) == 0) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, bias), 23)));
  }
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

}  // namespace fusedops
