"""The fused optimizer ops themselves: opcheck, clear errors for bad input, and the
CUDA kernels against the CPU ones and against torch's fp32 math (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import densepipe  # noqa: F401  (import densepipe alone registers the ops)
import densepipe.optim as dopt
from optim_probe import DEVICES, SIZES

ops = torch.ops.densepipe
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def lists(k: int, sizes=(1, 7, 65), dtype=torch.float32, device="cpu", seed=0):
    """k lists of one tensor per size; positive entries so every state is valid."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.rand(n, generator=g, dtype=torch.float64).add_(0.1).to(device, dtype) for n in sizes]
            for _ in range(k)]


def _centered_rmsprop_lists(L):
    """params, grads, square_avgs, momentum_buffers, grad_avgs with square_avg >= grad_avg^2, so
    the centered variance square_avg - grad_avg^2 stays positive (else its root is NaN)."""
    p, g, square_avgs, bufs, grad_avgs = L(5)
    for sq, ga in zip(square_avgs, grad_avgs, strict=True):
        sq.add_(ga * ga)
    return [p, g, square_avgs, bufs, grad_avgs]


# op -> (lists it takes, its scalar arguments); the lists are params, grads, state...
OP_CALLS = {
    "sgd_step_": lambda L: (L(3), (0.1, 0.9, 0.1, 0.01, False, False, False)),
    "adagrad_step_": lambda L: (L(3), (0.1, 0.01, 0.01, 1e-10, False, 3.0)),
    "rmsprop_step_": lambda L: (_centered_rmsprop_lists(L), (0.01, 0.99, 1e-8, 0.01, 0.9, True, False)),
    "adam_step_": lambda L: (L(5), (1e-3, 0.9, 0.999, 1e-8, 0.01, True, True, False, 3.0)),
    "nadam_step_": lambda L: (L(4), (1e-3, 0.9, 0.999, 1e-8, 0.01, 4e-3, True, False, 3.0, 0.3)),
    "adamax_step_": lambda L: (L(4), (1e-3, 0.9, 0.999, 1e-8, 0.01, False, 3.0)),
    "clip_grads_by_value_": lambda L: (L(1), (0.5,)),
}


@pytest.mark.parametrize("name", sorted(OP_CALLS))
def test_opcheck_step_ops(name):
    tensor_lists, scalars = OP_CALLS[name](lists)
    torch.library.opcheck(getattr(ops, name).default, (*tensor_lists, *scalars))


def test_opcheck_norm_ops():
    (grads,) = lists(1)
    torch.library.opcheck(ops.grad_norm.default, (grads, 2.0))
    torch.library.opcheck(ops.clip_grads_with_norm_.default, (grads, torch.tensor(0.5), 1.0))
    torch.library.opcheck(ops.advance_steps_.default, ([torch.tensor(0.0), torch.tensor(3.0)],))


def test_mul_scalars_multiplies_in_place_in_each_dtype():
    values = [torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64)]
    expected = [values[0] * 0.7, values[1] * 0.7]   # torch's own multiply, in each dtype
    out = ops.mul_scalars_(values, 0.7)
    assert out.dtype == torch.float64 and out.tolist() == [e.item() for e in expected]
    assert all(torch.equal(v, e) for v, e in zip(values, expected, strict=True))
    torch.library.opcheck(ops.mul_scalars_.default, ([torch.tensor(0.5), torch.tensor(2.0)], 0.9))
    with pytest.raises(RuntimeError, match=r"mul_scalars_: values\[0\] must be a floating-point tensor with one "
                                           r"element, got shape \[2\]"):
        ops.mul_scalars_([torch.zeros(2)], 0.5)


def test_advance_steps_counts_in_place():
    steps = [torch.tensor(0.0), torch.tensor(4.0, dtype=torch.float64)]
    assert ops.advance_steps_(steps).tolist() == [1.0, 5.0]
    assert [s.item() for s in steps] == [1.0, 5.0]


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_views_and_single_elements(device):
    """Views at odd offsets (no aligned vector loads) update like whole tensors."""
    base = lists(4, sizes=(4200,), device=device)
    views = [[t[1:] for t in L] for L in base]  # data pointer offset by one element
    copies = [[t.clone() for t in L] for L in views]
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 2.0)
    ops.adam_step_(views[0], views[1], views[2], views[3], [], *args)
    ops.adam_step_(copies[0], copies[1], copies[2], copies[3], [], *args)
    for a, b in zip(views[0] + views[2] + views[3], copies[0] + copies[2] + copies[3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OP_CALLS))
def test_shared_across_threads(name, threads):
    """Lists large enough to be cut into shares for several threads (share boundaries inside
    tensors, tensors inside shares) update exactly as pieces of 1000 elements updated one call
    at a time, each in a single share: the rules are elementwise, so any cut gives the same."""
    sizes = (70_001, 3, 40_000, 17, 33_333)  # 143K elements a list: several 64 KB shares
    make = lambda k: lists(k, sizes=sizes, seed=5)  # noqa: E731
    expected, scalars = OP_CALLS[name](make)
    for t, n in enumerate(sizes):
        for lo in range(0, n, 1000):
            getattr(ops, name)(*[[lst[t][lo:lo + 1000]] for lst in expected], *scalars)
    for count in (1, 2, 3):
        threads(count)
        tensor_lists, _ = OP_CALLS[name](make)
        getattr(ops, name)(*tensor_lists, *scalars)
        for a, b in zip(sum(tensor_lists, []), sum(expected, []), strict=True):
            assert torch.equal(a, b), f"{count} threads"


# -------------------------------------------------------------------- errors
def adam_args(params, grads, m, v, lr=1e-3, eps=1e-8, maxes=()):
    return (params, grads, m, v, list(maxes), lr, 0.9, 0.999, eps, 0.0, bool(maxes), False, False, 1.0)


def test_mismatched_list_lengths():
    p, g, m, v = lists(4)
    with pytest.raises(RuntimeError, match=r"adam_step_: grads has 2 tensors but params has 3"):
        ops.adam_step_(*adam_args(p, g[:2], m, v))


def test_mismatched_dtypes_and_shapes():
    p, g, m, v = lists(4)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype Double, expected Float"):
        ops.adam_step_(*adam_args(p, [g[0], g[1].double(), g[2]], m, v))
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] has dtype Double but params are Float"):
        ops.adam_step_(*adam_args(p, g, m, [t.double() for t in v]))
    with pytest.raises(RuntimeError, match=r"exp_avgs\[2\] has shape \[64\] but params\[2\] has shape"):
        ops.adam_step_(*adam_args(p, g, [m[0], m[1], m[2][:64]], v))
    with pytest.raises(RuntimeError, match="on CPU allowed: float32, float64"):
        ops.adam_step_(*adam_args([t.half() for t in p], [t.half() for t in g], m, v))


def test_bad_layouts():
    p, g, m, v = lists(4, sizes=(10,))
    strided = torch.zeros(20)[::2]
    with pytest.raises(RuntimeError, match=r"params\[0\] .* must cover one dense block of memory"):
        ops.adam_step_(*adam_args([strided], g, m, v))
    with pytest.raises(RuntimeError, match="sparse gradients are not supported"):
        ops.adam_step_(*adam_args(p, [g[0].to_sparse()], m, v))


def test_bad_hyperparameters_name_the_argument():
    p, g, m, v = lists(4)
    with pytest.raises(RuntimeError, match=r"adam_step_: invalid lr -1; allowed: 0 <= lr"):
        ops.adam_step_(*adam_args(p, g, m, v, lr=-1.0))
    with pytest.raises(RuntimeError, match=r"adam_step_: invalid eps -1e-08"):
        ops.adam_step_(*adam_args(p, g, m, v, eps=-1e-8))
    with pytest.raises(RuntimeError, match=r"sgd_step_: invalid lr -0.5"):
        ops.sgd_step_(p, g, [], -0.5, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="momentum_buffers must be empty unless momentum != 0"):
        ops.sgd_step_(p, g, m, 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match="max_exp_avg_sqs has 0 tensors but params has 3"):
        ops.adam_step_(p, g, m, v, [], 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, 1.0)
    with pytest.raises(RuntimeError, match=r"nadam_step_: invalid mu_product 1; allowed: 0 <= mu_product < 1"):
        ops.nadam_step_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 4e-3, False, False, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"adamax_step_: invalid step 0; allowed: 1 <= step"):
        ops.adamax_step_(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0)


# optimizer -> {argument: (bad value, torch.optim's message)}
BAD_ARGS = {
    dopt.SGD: {"lr": (-1, "Invalid learning rate: -1"), "momentum": (-0.1, "Invalid momentum value: -0.1"),
               "weight_decay": (-1, "Invalid weight_decay value: -1")},
    dopt.Adagrad: {"lr": (-1, "Invalid learning rate: -1"), "eps": (-1, "Invalid epsilon value: -1"),
                   "lr_decay": (-1, "Invalid lr_decay value: -1"),
                   "initial_accumulator_value": (-1, "Invalid initial_accumulator_value value: -1")},
    dopt.RMSprop: {"lr": (-1, "Invalid learning rate: -1"), "eps": (-1, "Invalid epsilon value: -1"),
                   "alpha": (-1, "Invalid alpha value: -1")},
    dopt.Adam: {"lr": (-1, "Invalid learning rate: -1"), "eps": (-1, "Invalid epsilon value: -1"),
                "betas": ((1.0, 0.999), "Invalid beta parameter at index 0: 1.0")},
    dopt.AdamW: {"betas": ((0.9, -0.1), "Invalid beta parameter at index 1: -0.1")},
    dopt.NAdam: {"momentum_decay": (-1, "Invalid momentum_decay value: -1"),
                 "weight_decay": (-1, "Invalid weight_decay value: -1")},
    dopt.Adamax: {"eps": (-1, "Invalid epsilon value: -1"),
                  "betas": ((0.9, 1.5), "Invalid beta parameter at index 1: 1.5")},
}


@pytest.mark.parametrize("cls,arg", [(c, a) for c, d in BAD_ARGS.items() for a in d],
                         ids=lambda x: getattr(x, "__name__", x))
def test_constructor_errors_read_like_torchs(cls, arg):
    value, message = BAD_ARGS[cls][arg]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls([torch.nn.Parameter(torch.zeros(3))], **{arg: value})


def test_bad_group_hyperparameters_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = dopt.Adam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        opt.add_param_group({"params": [p], "lr": -0.1})


def test_unsupported_flags():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        dopt.Adam(p, differentiable=True)
    with pytest.raises(RuntimeError, match="does not support capturable=True"):
        dopt.RMSprop(p, capturable=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        dopt.SGD(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        dopt.SGD(p, nesterov=True)
    dopt.AdamW(p, fused=True)  # accepted: every step is fused here
    dopt.Adagrad(p, foreach=False)


@pytest.mark.parametrize("cls", [dopt.SGD, dopt.Adagrad, dopt.RMSprop, dopt.Adam, dopt.NAdam, dopt.Adamax])
def test_sparse_gradients_are_refused(cls):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match=r"grads\[0\] is Sparse; sparse gradients are not supported"):
        cls([p], lr=0.1).step()


# ---------------------------------------------------------------------- CUDA
STEP_OPS = sorted(set(OP_CALLS) - {"clip_grads_by_value_"})


@needs_cuda
@pytest.mark.parametrize("name", STEP_OPS)
def test_cuda_matches_cpu(name):
    """Many tensors (more than one launch's metadata), one larger than a chunk."""
    sizes = (*SIZES, 70000) * 16  # 144 tensors
    cpu_lists, scalars = OP_CALLS[name](lambda k: lists(k, sizes=sizes))
    gpu_lists = [[t.cuda() for t in L] for L in cpu_lists]
    getattr(ops, name)(*cpu_lists, *scalars)
    getattr(ops, name)(*gpu_lists, *scalars)
    for a, b in zip(cpu_lists, gpu_lists, strict=True):
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(tb.cpu(), ta, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_cuda_device_mismatch():
    p, g, m, v = lists(4)
    with pytest.raises(RuntimeError, match=r"is on cpu but params\[0\] is on cuda:0"):
        ops.adam_step_(*adam_args([t.cuda() for t in p], g, m, v))


# bf16 keeps 8 bits of mantissa, fp16 11: after 20 steps from the same start the
# low-precision parameters stay within a few of their ulps of torch's fp32 run.
LOW_TOL = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}


@needs_cuda
@pytest.mark.parametrize("dtype", sorted(LOW_TOL, key=str), ids=str)
@pytest.mark.parametrize("name", sorted(dopt.OPTIMIZERS))
def test_cuda_low_precision_params_follow_fp32_math(name, dtype):
    torch.manual_seed(0)
    master = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in SIZES]
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in master]
    kw = dict(lr=1e-2, momentum=0.9) if name in ("sgd", "rmsprop") else dict(lr=1e-2)
    theirs = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
              "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam,
              "adamax": torch.optim.Adamax}[name](master, **kw)
    ours = dopt.OPTIMIZERS[name](low, **kw)
    for _ in range(20):
        for pm, pl in zip(master, low, strict=True):
            grad = torch.randn_like(pm)
            pm.grad, pl.grad = grad, grad.to(dtype)
        theirs.step()
        ours.step()
    for pm, pl in zip(master, low, strict=True):
        assert pl.dtype == dtype and all(t.dtype == torch.float32 for t in ours.state[pl].values()
                                         if t.dim() > 0)
        torch.testing.assert_close(pl.float(), pm.detach(), **LOW_TOL[dtype])


@needs_cuda
def test_cuda_low_precision_state_survives_a_state_dict_round_trip():
    p = torch.nn.Parameter(torch.randn(100, device="cuda", dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = dopt.Adam([p])
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[p].items()}
    opt.load_state_dict(opt.state_dict())
    for key, value in opt.state[p].items():
        assert value.dtype == saved[key].dtype
        assert torch.equal(value, saved[key])


def test_grads_in_another_layout_are_read_as_the_params():
    p, g, m, v = lists(4, sizes=(63,))
    params = [t.view(7, 9) for t in p]
    grads_t = [t.view(9, 7).t() for t in g]  # same values as (7, 9), strides (1, 7)
    twins = [t.clone() for t in params], [t.contiguous() for t in grads_t]
    state = [t.view(7, 9) for t in m], [t.view(7, 9) for t in v]
    state_twins = [t.clone() for t in state[0]], [t.clone() for t in state[1]]
    args = (1e-2, 0.9, 0.999, 1e-8, 0.1, False, True, False, 4.0)
    ops.adam_step_(params, grads_t, *state, [], *args)
    ops.adam_step_(*twins, *state_twins, [], *args)
    torch.testing.assert_close(params, twins[0], rtol=0, atol=0)
