// Vectorized (at::vec) activation math for the CPU kernels.
//   forward(z)      -> y
//   derivative(s)   -> dy/dz, where s is z if needs_preact(A) else y
// Transcendentals come from vec_math.h (fast float32, library float64).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "activation.h"
#include "vec_math.h"

namespace densepipe::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <Act A, typename T>
inline Vec<T> forward(Vec<T> z, Vec<T> alpha) {
  const Vec<T> zero(static_cast<T>(0)), one(static_cast<T>(1)), half(static_cast<T>(0.5));
  if constexpr (A == Act::Linear) {
    return z;
  } else if constexpr (A == Act::Relu) {
    return at::vec::clamp_min(z, zero);
  } else if constexpr (A == Act::LeakyRelu) {
    return Vec<T>::blendv(z * alpha, z, z > zero);
  } else if constexpr (A == Act::Elu) {
    return Vec<T>::blendv(alpha * vmath::expm1(z), z, z > zero);
  } else if constexpr (A == Act::Selu) {
    const Vec<T> scale(static_cast<T>(kSeluScale)), sa(static_cast<T>(kSeluScale * kSeluAlpha));
    return Vec<T>::blendv(sa * vmath::expm1(z), scale * z, z > zero);
  } else if constexpr (A == Act::Gelu) {
    return half * z * (one + vmath::erf(z * Vec<T>(static_cast<T>(kSqrtHalf))));
  } else if constexpr (A == Act::GeluTanh) {
    const Vec<T> inner = Vec<T>(static_cast<T>(kSqrt2OverPi)) * (z + Vec<T>(static_cast<T>(kGeluCoef)) * z * z * z);
    return half * z * (one + vmath::tanh(inner));
  } else if constexpr (A == Act::Silu) {
    return z / (one + vmath::exp(z.neg()));
  } else if constexpr (A == Act::Tanh) {
    return vmath::tanh(z);
  } else if constexpr (A == Act::Sigmoid) {
    return one / (one + vmath::exp(z.neg()));
  } else {  // Softplus: log(1 + e^z) = max(z, 0) + log1p(e^-|z|); linear above the threshold as torch
    const Vec<T> soft = at::vec::clamp_min(z, zero) + vmath::log1p_unit(vmath::exp(z.abs().neg()));
    return Vec<T>::blendv(soft, z, z > Vec<T>(static_cast<T>(kSoftplusThreshold)));
  }
}

template <Act A, typename T>
inline Vec<T> derivative(Vec<T> s, Vec<T> alpha) {
  const Vec<T> zero(static_cast<T>(0)), one(static_cast<T>(1)), half(static_cast<T>(0.5));
  if constexpr (A == Act::Linear) {
    return one;
  } else if constexpr (A == Act::Relu) {
    return Vec<T>::blendv(one, zero, s <= zero);  // s = y; y > 0 exactly where z > 0; NaN passes as torch
  } else if constexpr (A == Act::LeakyRelu) {
    return Vec<T>::blendv(alpha, one, s > zero);  // alpha >= 0 keeps sign(y) = sign(z)
  } else if constexpr (A == Act::Elu) {
    return Vec<T>::blendv(s + alpha, one, s > zero);  // alpha * e^z = y + alpha for z <= 0
  } else if constexpr (A == Act::Selu) {
    const Vec<T> scale(static_cast<T>(kSeluScale)), sa(static_cast<T>(kSeluScale * kSeluAlpha));
    return Vec<T>::blendv(s + sa, scale, s > zero);
  } else if constexpr (A == Act::Gelu) {  // s = z
    const Vec<T> cdf = half * (one + vmath::erf(s * Vec<T>(static_cast<T>(kSqrtHalf))));
    const Vec<T> pdf = Vec<T>(static_cast<T>(kInvSqrt2Pi)) * vmath::exp(s * s * Vec<T>(static_cast<T>(-0.5)));
    return cdf + s * pdf;
  } else if constexpr (A == Act::GeluTanh) {  // s = z
    const Vec<T> k(static_cast<T>(kSqrt2OverPi)), c(static_cast<T>(kGeluCoef));
    const Vec<T> s2 = s * s;
    const Vec<T> t = vmath::tanh(k * (s + c * s2 * s));
    const Vec<T> dinner = k * (one + Vec<T>(static_cast<T>(3 * kGeluCoef)) * s2);
    return half * (one + t) + half * s * (one - t * t) * dinner;
  } else if constexpr (A == Act::Silu) {  // s = z
    const Vec<T> sig = one / (one + vmath::exp(s.neg()));
    return sig * (one + s * (one - sig));
  } else if constexpr (A == Act::Tanh) {
    return one - s * s;  // s = y
  } else if constexpr (A == Act::Sigmoid) {
    return s * (one - s);  // s = y
  } else {  // Softplus: sigmoid(z) = 1 - e^{-y}
    return vmath::expm1(s.neg()).neg();
  }
}

}  // namespace densepipe::cpu
