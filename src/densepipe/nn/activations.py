"""Activation registry: name -> how the fused kernel runs it and a plain-torch reference.

Names follow Keras / PyTorch. Activations the dense kernel fuses carry
`fused=True`; the others (softmax, step, ...) run as a plain torch op after a
fused linear layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from densepipe.registry import Registry


@dataclass(frozen=True)
class Activation:
    name: str                                 # canonical name (the kernel's, when fused)
    reference: Callable[[Tensor, float], Tensor]  # plain torch: f(z, alpha)
    fused: bool = True                        # runs inside the dense kernel
    needs_preact: bool = False                # backward needs z (else it uses y)
    default_alpha: float = 0.0                # leaky_relu slope / elu saturation
    # A row's largest input gives its largest output, so the argmax of one is the other's. Saturating
    # ones (sigmoid, tanh) make ties of large inputs in float32, which argmax breaks toward the first.
    keeps_order: bool = False


def _step(z: Tensor, alpha: float) -> Tensor:
    # Heaviside step of the classic perceptron; its gradient is zero almost everywhere,
    # so it is trained with the perceptron rule, not by backpropagation.
    return (z >= 0).to(z.dtype)


# ATen's CPU (log_)softmax over the last dim vectorizes along that dim; rows narrower than
# one AVX-512 register of floats (a handful of classes) leave it in scalar tails, about 10x
# slower than the same reduction taken down dim 0 of the transposed view, which vectorizes
# across rows. The same values up to rounding (float32 and float64 agree to the last bit in
# the tests; half types within a few ulp); rows of 16 or more keep the direct path. The result
# is made contiguous again: row-wise ops on the transposed layout (argmax) are as slow.
_NARROW_ROW = 16


def softmax_rows(z: Tensor, log: bool = False) -> Tensor:
    """softmax (or log_softmax) over the last dim."""
    fn = torch.log_softmax if log else torch.softmax
    if z.dim() == 2 and z.shape[-1] < _NARROW_ROW and z.device.type == "cpu":
        return fn(z.t(), 0).t().contiguous()
    return fn(z, -1)


_TABLE = [
    Activation("linear", lambda z, a: z, keeps_order=True),
    Activation("relu", lambda z, a: F.relu(z)),
    # Keras 3's default slope (keras.activations.leaky_relu); torch's nn.LeakyReLU takes 0.01.
    Activation("leaky_relu", lambda z, a: F.leaky_relu(z, a), default_alpha=0.2),
    Activation("elu", lambda z, a: F.elu(z, a), default_alpha=1.0),
    Activation("selu", lambda z, a: F.selu(z)),
    Activation("gelu", lambda z, a: F.gelu(z), needs_preact=True),
    Activation("gelu_tanh", lambda z, a: F.gelu(z, approximate="tanh"), needs_preact=True),
    Activation("silu", lambda z, a: F.silu(z), needs_preact=True),
    Activation("tanh", lambda z, a: torch.tanh(z)),
    Activation("sigmoid", lambda z, a: torch.sigmoid(z)),
    Activation("softplus", lambda z, a: F.softplus(z)),
    # Not fused: applied after the kernel's linear output.
    Activation("softmax", lambda z, a: softmax_rows(z), fused=False, keeps_order=True),
    Activation("log_softmax", lambda z, a: softmax_rows(z, log=True), fused=False, keeps_order=True),
    Activation("softsign", lambda z, a: F.softsign(z), fused=False),
    Activation("relu6", lambda z, a: F.relu6(z), fused=False),
    Activation("hard_sigmoid", lambda z, a: F.hardsigmoid(z), fused=False),
    Activation("mish", lambda z, a: F.mish(z), fused=False),
    Activation("exponential", lambda z, a: torch.exp(z), fused=False),
    Activation("step", _step, fused=False),
]

ACTIVATIONS: Registry[Activation] = Registry("activation")
for _a in _TABLE:
    ACTIVATIONS.add(_a.name, _a)
for _alias, _name in {
    "identity": "linear", "none": "linear", "swish": "silu", "gelu_approx": "gelu_tanh",
    "gelu_approximate": "gelu_tanh", "leakyrelu": "leaky_relu", "logistic": "sigmoid",
    "heaviside": "step",
}.items():
    ACTIVATIONS.alias(_alias, _name)
FUSED = tuple(a.name for a in _TABLE if a.fused)


def resolve(name: str | None) -> Activation:
    """Looks a name (or alias) up; raises ValueError naming the allowed ones."""
    return ACTIVATIONS["linear" if name is None else name]


def alpha_for(act: Activation, alpha: float | None) -> float:
    return act.default_alpha if alpha is None else float(alpha)
