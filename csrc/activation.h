// Activation functions of the fused dense op: names, and which value the
// backward pass needs. The math itself lives beside each backend
// (activation_cpu.h for at::vec, cuda/activation.cuh for device code).
#pragma once

#include <string>
#include <type_traits>

namespace densepipe {

enum class Act : int {
  Linear,
  Relu,
  LeakyRelu,  // alpha: slope for z < 0
  Elu,        // alpha: saturation value for z -> -inf
  Selu,
  Gelu,       // exact, with erf
  GeluTanh,   // tanh approximation
  Silu,       // a.k.a. swish
  Tanh,
  Sigmoid,
  Softplus,   // beta = 1, threshold = 20 (as torch.nn.Softplus)
};

// Parses a canonical activation name; TORCH_CHECKs with the list of names on failure.
Act parse_activation(const std::string& name);

// The backward pass needs the pre-activation z only where act'(z) cannot be
// recovered from the output y; everywhere else we save y and keep no z.
constexpr bool needs_preact(Act a) {
  return a == Act::Gelu || a == Act::GeluTanh || a == Act::Silu;
}

// Calls f(std::integral_constant<Act, a>) so kernels are compiled per activation
// with no branch inside the element loop.
template <typename F>
decltype(auto) dispatch_activation(Act a, F&& f) {
  using A = Act;
  switch (a) {
    case A::Linear: return f(std::integral_constant<A, A::Linear>{});
    case A::Relu: return f(std::integral_constant<A, A::Relu>{});
    case A::LeakyRelu: return f(std::integral_constant<A, A::LeakyRelu>{});
    case A::Elu: return f(std::integral_constant<A, A::Elu>{});
    case A::Selu: return f(std::integral_constant<A, A::Selu>{});
    case A::Gelu: return f(std::integral_constant<A, A::Gelu>{});
    case A::GeluTanh: return f(std::integral_constant<A, A::GeluTanh>{});
    case A::Silu: return f(std::integral_constant<A, A::Silu>{});
    case A::Tanh: return f(std::integral_constant<A, A::Tanh>{});
    case A::Sigmoid: return f(std::integral_constant<A, A::Sigmoid>{});
    case A::Softplus: return f(std::integral_constant<A, A::Softplus>{});
  }
  return f(std::integral_constant<A, A::Linear>{});
}

// Constants shared by both backends.
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSqrtHalf = 0.70710678118654752440;       // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;    // sqrt(2/pi)
constexpr double kGeluCoef = 0.044715;
constexpr double kSoftplusThreshold = 20.0;

}  // namespace densepipe
