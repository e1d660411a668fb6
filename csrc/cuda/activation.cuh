// Device activation math for the CUDA kernels, the counterpart of
// activation_cpu.h (same formulas, one element at a time).
//   forward(z)      -> y
//   derivative(s)   -> dy/dz, where s is z if needs_preact(A) else y
// C is the compute type: float for float32/float16/bfloat16 storage, double
// for float64 (so gradcheck's finite differences are not drowned by rounding).
#pragma once

#include <type_traits>

#include "../activation.h"

namespace densepipe::cuda {

// Explicit float/double overloads: the single-precision functions must not
// silently promote to double in the float path.
template <typename C>
__device__ __forceinline__ C dexp(C v) {
  if constexpr (std::is_same_v<C, float>) return expf(v); else return exp(v);
}
template <typename C>
__device__ __forceinline__ C dexpm1(C v) {
  if constexpr (std::is_same_v<C, float>) return expm1f(v); else return expm1(v);
}
template <typename C>
__device__ __forceinline__ C dlog1p(C v) {
  if constexpr (std::is_same_v<C, float>) return log1pf(v); else return log1p(v);
}
template <typename C>
__device__ __forceinline__ C dtanh(C v) {
  if constexpr (std::is_same_v<C, float>) return tanhf(v); else return tanh(v);
}
template <typename C>
__device__ __forceinline__ C derf(C v) {
  if constexpr (std::is_same_v<C, float>) return erff(v); else return erf(v);
}

template <Act A, typename C>
__device__ __forceinline__ C forward(C z, C alpha) {
  const C one = C(1), half = C(0.5);
  if constexpr (A == Act::Linear) {
    return z;
  } else if constexpr (A == Act::Relu) {
    return z <= C(0) ? C(0) : z;  // written so NaN passes through, as torch.relu does
  } else if constexpr (A == Act::LeakyRelu) {
    return z > C(0) ? z : z * alpha;
  } else if constexpr (A == Act::Elu) {
    return z > C(0) ? z : alpha * dexpm1(z);
  } else if constexpr (A == Act::Selu) {
    return z > C(0) ? C(kSeluScale) * z : C(kSeluScale * kSeluAlpha) * dexpm1(z);
  } else if constexpr (A == Act::Gelu) {
    return half * z * (one + derf(z * C(kSqrtHalf)));
  } else if constexpr (A == Act::GeluTanh) {
    return half * z * (one + dtanh(C(kSqrt2OverPi) * (z + C(kGeluCoef) * z * z * z)));
  } else if constexpr (A == Act::Silu) {
    return z / (one + dexp(-z));
  } else if constexpr (A == Act::Tanh) {
    return dtanh(z);
  } else if constexpr (A == Act::Sigmoid) {
    return one / (one + dexp(-z));
  } else {  // Softplus: log(1 + e^z), linear above the threshold as torch does
    return z > C(kSoftplusThreshold) ? z : dlog1p(dexp(z));
  }
}

template <Act A, typename C>
__device__ __forceinline__ C derivative(C s, C alpha) {
  const C one = C(1), half = C(0.5);
  if constexpr (A == Act::Linear) {
    return one;
  } else if constexpr (A == Act::Relu) {
    return s <= C(0) ? C(0) : one;  // s = y; y > 0 exactly where z > 0; a NaN passes the gradient as torch's CUDA kernel
  } else if constexpr (A == Act::LeakyRelu) {
    return s > C(0) ? one : alpha;  // alpha >= 0 keeps sign(y) = sign(z)
  } else if constexpr (A == Act::Elu) {
    return s <= C(0) ? s + alpha : one;  // alpha * e^z = y + alpha for z <= 0; NaN: 1, as torch's CUDA kernel
  } else if constexpr (A == Act::Selu) {
    return s <= C(0) ? s + C(kSeluScale * kSeluAlpha) : C(kSeluScale);
  } else if constexpr (A == Act::Gelu) {  // s = z
    const C cdf = half * (one + derf(s * C(kSqrtHalf)));
    const C pdf = C(kInvSqrt2Pi) * dexp(C(-0.5) * s * s);
    return cdf + s * pdf;
  } else if constexpr (A == Act::GeluTanh) {  // s = z
    const C s2 = s * s;
    const C t = dtanh(C(kSqrt2OverPi) * (s + C(kGeluCoef) * s2 * s));
    const C dinner = C(kSqrt2OverPi) * (one + C(3 * kGeluCoef) * s2);
    return half * (one + t) + half * s * (one - t * t) * dinner;
  } else if constexpr (A == Act::Silu) {  // s = z
    const C sig = one / (one + dexp(-s));
    return sig * (one + s * (one - sig));
  } else if constexpr (A == Act::Tanh) {
    return one - s * s;  // s = y
  } else if constexpr (A == Act::Sigmoid) {
    return s * (one - s);  // s = y
  } else {  // Softplus: sigmoid(z) = 1 - e^{-y}
    return -dexpm1(-s);
  }
}

}  // namespace densepipe::cuda
