// Transcendental functions on at::vec::Vectorized for the dense epilogues.
//
// float32: polynomial / rational approximations accurate to a few ulp. at::vec's
// float exp, expm1, tanh and log1p call Sleef's 1-ulp versions, which cost 2-4x as
// much; an epilogue that has to hide behind a GEMM cannot afford that (a tanh
// epilogue took ~11% of a 1024x512x512 GEMM with Sleef on 2 cores).
// float64: the library versions, unchanged (gradcheck runs in float64; accuracy first).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace densepipe::cpu::vmath {

template <typename T>
using Vec = at::vec::Vectorized<T>;
using VecF = Vec<float>;
using VecI = Vec<int32_t>;

inline Vec<double> exp(Vec<double> x) { return x.exp(); }
inline Vec<double> expm1(Vec<double> x) { return x.expm1(); }
inline Vec<double> tanh(Vec<double> x) { return x.tanh(); }
inline Vec<double> erf(Vec<double> x) { return x.erf(); }
inline Vec<double> log1p_unit(Vec<double> u) { return u.log1p(); }

namespace detail {

// Horner's rule, highest coefficient first.
template <size_t N>
inline VecF poly(VecF x, const float (&c)[N]) {
  VecF p(c[0]);
  for (size_t i = 1; i < N; ++i) p = at::vec::fmadd(p, x, VecF(c[i]));
  return p;
}

// x = n * ln2 + r with n integral and |r| <= ln2 / 2 (Cody-Waite: ln2 split in two
// so n * ln2_hi is exact for |n| < 2^9).
inline VecF reduce_ln2(VecF x, VecF& n) {
  n = (x * VecF(1.44269504088896341f)).round();  // log2(e)
  const VecF r = at::vec::fmadd(n, VecF(-0.693359375f), x);  // ln2 high part
  return at::vec::fmadd(n, VecF(2.12194440e-4f), r);           // minus ln2 low part
}

// 2^n for integral n in [-126, 127], built in the exponent field (n = -127 gives 0).
inline VecF pow2(VecF n) {
  const VecI i = at::vec::convert_to_int_of_same_size(n);
  return at::vec::cast<float>((i + VecI(127)) << VecI(23));
}

}  // namespace detail

// e^x, <= 2 ulp for x in [-86.9, 88.7]. Below, where e^x < 2^-125.5, it flushes to 0;
// above it saturates at FLT_MAX. The activations only take 1 / (1 + e^x), log1p(e^x)
// or e^x next to O(1) terms, where both limits give the float result.
inline VecF exp(VecF x) {
  constexpr float kPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,  // Cephes expf
                             4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  x = at::vec::clamp(x, VecF(-87.3365447f), VecF(88.7228391f));  // ln(FLT_MIN), ln(FLT_MAX); NaN passes
  VecF n;
  const VecF r = detail::reduce_ln2(x, n);
  const VecF p = at::vec::fmadd(detail::poly(r, kPoly), r * r, r + VecF(1.0f));
  // n reaches 128, one past the largest float exponent: scale by 2^(n-1), then 2.
  return (p + p) * detail::pow2(n - VecF(1.0f));
}

// e^x - 1 without cancellation near 0, <= 2 ulp on [-88, 88]; saturates outside
// (-1 below, expm1(88) above: the activations use it only for x <= 0).
inline VecF expm1(VecF x) {
  constexpr float kPoly[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f};  // Taylor
  x = at::vec::clamp(x, VecF(-88.0f), VecF(88.0f));
  VecF n;
  const VecF r = detail::reduce_ln2(x, n);
  const VecF q = at::vec::fmadd(detail::poly(r, kPoly), r * r, r);  // e^r - 1, |r| <= ln2/2
  const VecF s = detail::pow2(n);                                     // 0 for n = -127
  return at::vec::fmadd(s, q, s - VecF(1.0f));                        // 2^n (e^r - 1) + 2^n - 1
}

// tanh as a rational function of x^2, <= 6 ulp. The rational reaches 1 near |x| = 9.1,
// where float tanh does, and overshoots beyond: inputs are clamped to +-9.2 and the
// result to [-1, 1], so the tails are exactly +-1 (gelu_tanh's derivative needs 1 - t^2
// to be exactly 0 there).
inline VecF tanh(VecF x) {
  constexpr float kNum[] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                            5.12229709037114e-08f, 1.48572235717979e-05f, 6.37261928875436e-04f,
                            4.89352455891786e-03f};
  constexpr float kDen[] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                            4.89352518554385e-03f};
  const VecF c = at::vec::clamp(x, VecF(-9.2f), VecF(9.2f));
  const VecF c2 = c * c;
  const VecF t = at::vec::clamp(c * detail::poly(c2, kNum) / detail::poly(c2, kDen), VecF(-1.0f), VecF(1.0f));
  return VecF::blendv(t, x, x.abs() < VecF(4e-4f));  // tanh(x) = x to float precision
}

// erf as a rational function of x^2 on [-4, 4] (+-1 beyond), <= 7 ulp.
inline VecF erf(VecF x) {
  constexpr float kNum[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                            -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                            -1.60960333262415e-02f};
  constexpr float kDen[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                            -7.37332916720468e-03f, -1.42647390514189e-02f};
  const VecF c = at::vec::clamp(x, VecF(-4.0f), VecF(4.0f));
  const VecF c2 = c * c;
  return c * detail::poly(c2, kNum) / detail::poly(c2, kDen);
}

// log(1 + u) for u in [0, 1]: 2 atanh(s) with s = u / (2 + u) <= 1/3, as an odd
// series in s (terms to s^13: truncation < 2e-8 relative).
inline VecF log1p_unit(VecF u) {
  constexpr float kPoly[] = {1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7, 1.0f / 5, 1.0f / 3, 1.0f};
  const VecF s = u / (u + VecF(2.0f));
  return VecF(2.0f) * s * detail::poly(s * s, kPoly);
}

}  // namespace densepipe::cpu::vmath
