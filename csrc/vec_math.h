// Vector lane helpers of the CPU kernels: loads and stores that convert the stored dtype to the
// compute one, and lane math cheaper than at::vec's where a kernel can give up what it does not need.
// exp_nonpositive: exp of x <= 0, cheaper than Vectorized::exp (Sleef's u10):
//   exp(x) = 2^n * exp(r),  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
//   exp(r) = 1 + r + r^2 q(r),  q a degree-4 fit to (exp(r) - 1 - r) / r^2: within 1.01 ulp in fp32
//   over every x <= 0 (checked exhaustively), subnormal results included
// fp32 lanes under AVX2 only; other types and builds use Vectorized::exp.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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
      if (n == Vec::size()) {  // v packed twice into one vector of 2n lanes: its first n are v's
        at::vec::convert_from_float<scalar_t>(v, v).store(p, Vec::size());
        return;
      }
    }
    alignas(64) acc_t buf[Vec::size()];
    v.store(buf);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(buf[k]);
  }
}

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
#endif

}  // namespace fusedops
