#include "activation.h"

#include <c10/util/Exception.h>

#include <array>
#include <utility>

namespace densepipe {

namespace {
constexpr std::array<std::pair<const char*, Act>, 11> kNames{{
    {"linear", Act::Linear},
    {"relu", Act::Relu},
    {"leaky_relu", Act::LeakyRelu},
    {"elu", Act::Elu},
    {"selu", Act::Selu},
    {"gelu", Act::Gelu},
    {"gelu_tanh", Act::GeluTanh},
    {"silu", Act::Silu},
    {"tanh", Act::Tanh},
    {"sigmoid", Act::Sigmoid},
    {"softplus", Act::Softplus},
}};
}  // namespace

Act parse_activation(const std::string& name) {
  for (const auto& [n, a] : kNames) {
    if (name == n) return a;
  }
  std::string allowed;  // built only for the error: every dense call parses its activation
  for (const auto& [n, a] : kNames) allowed += allowed.empty() ? n : std::string(", ") + n;
  TORCH_CHECK(false, "densepipe dense: unknown activation '", name, "'; allowed: ", allowed);
}

}  // namespace densepipe
