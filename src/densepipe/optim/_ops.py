"""Python side of the fused optimizer ops: loads the extension and registers fake
kernels, so the ops trace under torch.compile and meta tensors.

The ops (schemas in csrc/optim.cpp) update their list arguments in place and
return nothing, except grad_norm, which returns a 0-d tensor.
"""

from __future__ import annotations

import torch

from densepipe import _C  # noqa: F401  (loads the library: runs the TORCH_LIBRARY registrations)

ops = torch.ops.densepipe

_IN_PLACE = ("sgd_step_", "adagrad_step_", "rmsprop_step_", "adam_step_", "nadam_step_", "adamax_step_",
             "clip_grads_with_norm_", "clip_grads_by_value_")


def _mutates_only(*args, **kwargs) -> None:
    return None


for _name in _IN_PLACE:
    torch.library.register_fake(f"densepipe::{_name}")(_mutates_only)


@torch.library.register_fake("densepipe::grad_norm")
def _grad_norm_fake(grads, norm_type):
    torch._check(len(grads) > 0, lambda: "densepipe grad_norm: grads is empty")
    return grads[0].new_empty(())


@torch.library.register_fake("densepipe::advance_steps_")
def _advance_steps_fake(steps):
    return torch.empty(len(steps), dtype=torch.float64, device="cpu")


@torch.library.register_fake("densepipe::mul_scalars_")
def _mul_scalars_fake(values, factor):
    return torch.empty(len(values), dtype=torch.float64, device="cpu")
