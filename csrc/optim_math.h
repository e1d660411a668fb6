// The update rules of the fused optimizers, written once for both backends.
//
// Each rule is a functor over one "lane" V: an at::vec::Vectorized<T> on CPU or a
// scalar T in a CUDA thread, where T (float, or double for float64 params) is the
// math type. The driver loads x[k] from list k, calls the rule, and stores back
// every list the rule writes (all but the gradient, list 1). The formulas follow
// torch.optim's single-tensor code operation by operation, so results agree with
// it to rounding.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DP_HD __host__ __device__ __forceinline__
#else
#define DP_HD inline
#endif

namespace densepipe::optim {

// Elementwise primitives for a lane type; the CPU file specialises it for Vectorized.
template <typename V>
struct Lane;

template <typename T>
struct ScalarLane {
  static DP_HD T sqrt(T x) { return ::sqrt(x); }
  static DP_HD T div(T a, T b) { return a / b; }
  static DP_HD T neg(T x) { return -x; }
  static DP_HD T max(T a, T b) { return (a != a || a > b) ? a : b; }  // NaN propagates
  static DP_HD T min(T a, T b) { return (a != a || a < b) ? a : b; }
  static DP_HD T abs(T x) { return ::fabs(x); }
  static DP_HD T pow(T x, T p) { return ::pow(x, p); }
};
// Division and square root round to nearest even under nvcc's --use_fast_math,
// so state matches torch's (and the CPU's) to the ulp, not to a few.
template <>
struct Lane<float> : ScalarLane<float> {
#if defined(__CUDA_ARCH__)
  static DP_HD float sqrt(float x) { return __fsqrt_rn(x); }
  static DP_HD float div(float a, float b) { return __fdiv_rn(a, b); }
#else
  static DP_HD float sqrt(float x) { return ::sqrtf(x); }
#endif
  static DP_HD float abs(float x) { return ::fabsf(x); }
  static DP_HD float pow(float x, float p) { return ::powf(x, p); }
};
template <>
struct Lane<double> : ScalarLane<double> {};

// torch.lerp's two-sided formula: a + w (b - a) for w < 0.5, else b - (b - a)(1 - w).
template <typename V, typename T>
DP_HD V lerp(V a, V b, T w) {
  return w < T(0.5) ? a + V(w) * (b - a) : b - (b - a) * V(T(1) - w);
}

// Gradient as the rules see it: negated under maximize, plus L2 weight decay.
template <typename V, typename T>
DP_HD V effective_grad(V g, V p, bool maximize, T weight_decay) {
  if (maximize) g = Lane<V>::neg(g);
  if (weight_decay != T(0)) g = g + V(weight_decay) * p;
  return g;
}

// ------------------------------------------------------------------------ SGD
// lists: param, grad[, momentum_buffer]
template <typename T, bool kMomentum>
struct SgdRule {
  static constexpr int kLists = kMomentum ? 3 : 2;
  T lr;                // step size
  T momentum;          // buffer decay
  T dampening_keep;    // 1 - dampening: the share of each gradient the buffer takes
  T weight_decay;      // L2 penalty added to the gradient
  bool nesterov;       // step along g + momentum * buffer
  bool maximize;       // ascend
  bool first_step;     // the buffer is new: it starts as the gradient itself

  template <typename V>
  DP_HD void operator()(V* x) const {
    V& p = x[0];
    V g = effective_grad(x[1], p, maximize, weight_decay);
    if constexpr (kMomentum) {
      V& buf = x[2];
      buf = first_step ? g : buf * V(momentum) + V(dampening_keep) * g;
      g = nesterov ? g + V(momentum) * buf : buf;
    }
    p = p - V(lr) * g;
  }
};

// -------------------------------------------------------------------- Adagrad
// lists: param, grad, sum
template <typename T>
struct AdagradRule {
  static constexpr int kLists = 3;
  T clr;           // lr / (1 + (step - 1) * lr_decay), from double
  T weight_decay;  // L2 penalty added to the gradient
  T eps;           // added to sqrt(sum)
  bool maximize;   // ascend

  template <typename V>
  DP_HD void operator()(V* x) const {
    V& p = x[0];
    V& sum = x[2];
    const V g = effective_grad(x[1], p, maximize, weight_decay);
    sum = sum + g * g;
    const V std = Lane<V>::sqrt(sum) + V(eps);
    p = p - V(clr) * Lane<V>::div(g, std);
  }
};

// -------------------------------------------------------------------- RMSprop
// lists: param, grad, square_avg[, momentum_buffer][, grad_avg]
template <typename T, bool kMomentum, bool kCentered>
struct RmspropRule {
  static constexpr int kBuf = 3;
  static constexpr int kGradAvg = kMomentum ? 4 : 3;
  static constexpr int kLists = 3 + int(kMomentum) + int(kCentered);
  T lr;            // step size
  T alpha;         // decay of the squared-gradient average
  T alpha_rest;    // 1 - alpha, from double
  T eps;           // added to the root mean square
  T weight_decay;  // L2 penalty added to the gradient
  T momentum;      // buffer decay
  bool maximize;   // ascend

  template <typename V>
  DP_HD void operator()(V* x) const {
    V& p = x[0];
    V& sq = x[2];
    const V g = effective_grad(x[1], p, maximize, weight_decay);
    sq = sq * V(alpha) + V(alpha_rest) * (g * g);
    V avg;
    if constexpr (kCentered) {
      V& ga = x[kGradAvg];
      ga = lerp(ga, g, alpha_rest);
      avg = Lane<V>::sqrt(sq - ga * ga);
    } else {
      avg = Lane<V>::sqrt(sq);
    }
    avg = avg + V(eps);
    if constexpr (kMomentum) {
      V& buf = x[kBuf];
      buf = buf * V(momentum) + Lane<V>::div(g, avg);
      p = p - V(lr) * buf;
    } else {
      p = p - V(lr) * Lane<V>::div(g, avg);
    }
  }
};

// ------------------------------------------------------------- Adam family
// What every Adam-style step with a second moment does first: weight decay (coupled into
// the gradient, or decoupled onto the weights), then both moment averages, rounded in
// torch's order (lerp, then v * beta2 + ((1 - beta2) * g) * g as its addcmul).
template <typename T>
struct AdamMoments {
  T beta1_rest;    // 1 - beta1, from double
  T beta2;         // decay of the second-moment average
  T beta2_rest;    // 1 - beta2, from double
  T weight_decay;  // L2 penalty, or decay rate when decoupled
  T param_decay;   // 1 - lr * weight_decay, for decoupled decay, from double
  bool decoupled;  // AdamW / decoupled NAdam: decay the weights, not the gradient
  bool maximize;   // ascend

  // Updates p (decay), m and v in place; returns the gradient the step reads.
  template <typename V>
  DP_HD V operator()(V& p, V grad, V& m, V& v) const {
    if (decoupled && weight_decay != T(0)) p = p * V(param_decay);
    const V g = effective_grad(grad, p, maximize, decoupled ? T(0) : weight_decay);
    m = lerp(m, g, beta1_rest);
    v = v * V(beta2) + V(beta2_rest) * g * g;
    return g;
  }
};

// lists: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]
template <typename T, bool kAmsgrad>
struct AdamRule {
  static constexpr int kLists = kAmsgrad ? 5 : 4;
  AdamMoments<T> moments;
  T eps;        // added to the bias-corrected root of the second moment
  T step_size;  // lr / (1 - beta1^step), from double
  T bc2_sqrt;   // sqrt(1 - beta2^step), from double

  template <typename V>
  DP_HD void operator()(V* x) const {
    V& p = x[0];
    V& m = x[2];
    V& v = x[3];
    moments(p, x[1], m, v);
    V second = v;
    if constexpr (kAmsgrad) {
      x[4] = Lane<V>::max(x[4], v);
      second = x[4];
    }
    const V denom = Lane<V>::div(Lane<V>::sqrt(second), V(bc2_sqrt)) + V(eps);
    p = p - V(step_size) * Lane<V>::div(m, denom);
  }
};

// lists: param, grad, exp_avg, exp_avg_sq. NAdam, Adam with Nesterov momentum: the step
// mixes the new gradient and the running average, weighted by the momentum schedule mu_t.
template <typename T>
struct NadamRule {
  static constexpr int kLists = 4;
  AdamMoments<T> moments;
  T eps;        // added to the bias-corrected root of the second moment
  T bc2;        // 1 - beta2^step, from double
  T grad_step;  // lr (1 - mu_t) / (1 - prod mu): the step along the gradient itself
  T avg_step;   // lr mu_{t+1} / (1 - prod mu * mu_{t+1}): the step along the average

  template <typename V>
  DP_HD void operator()(V* x) const {
    V& p = x[0];
    V& m = x[2];
    V& v = x[3];
    const V g = moments(p, x[1], m, v);
    const V denom = Lane<V>::sqrt(Lane<V>::div(v, V(bc2))) + V(eps);
    // (step * x) / denom, in torch's order (addcdiv): the two terms nearly cancel at times,
    // where another rounding order would show.
    p = p - Lane<V>::div(V(grad_step) * g, denom);
    p = p - Lane<V>::div(V(avg_step) * m, denom);
  }
};

// -------------------------------------------------------------------- Adamax
// lists: param, grad, exp_avg, exp_inf. Adam with the second moment replaced by an
// exponentially weighted infinity norm (torch's form: eps inside the max).
template <typename T>
struct AdamaxRule {
  static constexpr int kLists = 4;
  T beta1_rest;    // 1 - beta1, from double
  T beta2;         // decay of the infinity norm
  T eps;           // added to |g| before the max
  T weight_decay;  // L2 penalty added to the gradient
  T step_size;     // lr / (1 - beta1^step), from double
  bool maximize;   // ascend

  template <typename V>
  DP_HD void operator()(V* x) const {
    V& p = x[0];
    V& m = x[2];
    V& u = x[3];
    const V g = effective_grad(x[1], p, maximize, weight_decay);
    m = lerp(m, g, beta1_rest);
    u = Lane<V>::max(u * V(beta2), Lane<V>::abs(g) + V(eps));
    // (step * m) / u, torch's order (addcdiv): where u falls to eps the ratio is large, and
    // another rounding order would show.
    p = p - Lane<V>::div(V(step_size) * m, u);
  }
};

// ------------------------------------------------------------------ clipping
// lists: grad. Clamp to [-clip, clip]; NaN stays NaN as in torch.clamp.
template <typename T>
struct ClampRule {
  static constexpr int kLists = 1;
  T clip;  // clip_value

  template <typename V>
  DP_HD void operator()(V* x) const {
    x[0] = Lane<V>::min(Lane<V>::max(x[0], V(-clip)), V(clip));
  }
};

// lists: grad. g *= min(max_norm / (total_norm + 1e-6), 1), with torch's rounding
// (reciprocal, then times max_norm). `norm` points at the total norm where the
// kernel runs, so a GPU reads it without a host round trip.
template <typename T>
struct ScaleByNormRule {
  static constexpr int kLists = 1;
  const T* norm;  // the total norm, one element
  T max_norm;     // the norm to clip to

  DP_HD T coef() const {
    const T c = Lane<T>::div(T(1), *norm + T(1e-6)) * max_norm;
    return c > T(1) ? T(1) : c;  // NaN stays NaN, as torch.clamp(max=1)
  }
  // Multiplying by exactly 1 changes nothing: the pass can be skipped.
  DP_HD bool skip() const { return coef() == T(1); }

  template <typename V>
  DP_HD void operator()(V* x) const {
    x[0] = x[0] * V(coef());
  }
};

// ------------------------------------------------------------- total norm
// The kinds of total norm the clipping pass computes, from torch's norm_type.
enum class NormKind { One, Two, P, Inf, NegInf };

// Per-element contribution |x|, |x|^2, |x|^p; combined by sum, max or min.
template <NormKind K, typename V, typename T>
DP_HD V norm_term(V x, T p) {
  const V a = Lane<V>::abs(x);
  if constexpr (K == NormKind::Two) return a * a;
  else if constexpr (K == NormKind::P) return Lane<V>::pow(a, V(p));
  else return a;
}

template <NormKind K, typename V>
DP_HD V norm_combine(V acc, V term) {
  if constexpr (K == NormKind::Inf) return Lane<V>::max(acc, term);
  else if constexpr (K == NormKind::NegInf) return Lane<V>::min(acc, term);
  else return acc + term;
}

// The combine's identity: 0 for sums and max of |x|, +inf for min.
template <NormKind K, typename T>
DP_HD T norm_identity() {
  return K == NormKind::NegInf ? T(INFINITY) : T(0);
}

// The total norm from the combined terms.
template <NormKind K>
DP_HD double norm_finish(double acc, double p) {
  if constexpr (K == NormKind::Two) return ::sqrt(acc);
  else if constexpr (K == NormKind::P) return ::pow(acc, 1.0 / p);
  else return acc;
}

}  // namespace densepipe::optim
