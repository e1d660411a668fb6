"""Data-parallel training over processes: torch.distributed, started by torchrun.

Every rank holds the whole split in memory and draws the same permutation each
epoch. Global step s covers rows perm[s*B:(s+1)*B]; rank r trains on that step's
rows r, r+world, r+2*world, ... (DistributedSampler's interleaving, applied to each
global batch), so N processes take exactly the steps one process takes with batch B.
DistributedDataParallel averages the gradients over ranks; each rank scales its loss
sum by world / (rows in the global step), so that average is the global batch's mean,
also for a short last step in which some ranks get no rows at all.
"""

from __future__ import annotations

import itertools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from densepipe.threads import share_cores

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # device type -> process group backend


class WorkerFailure(RuntimeError):
    """A process of a distributed job failed; the launcher stopped the others."""


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0   # the process's index on its machine: its GPU

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and talks to MLflow."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """Inside a process started by torchrun (or any launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def should_launch(nproc: int) -> bool:
    return nproc > 1 and not launched()


def current() -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def device(setting: str) -> torch.device:
    """train.device as a torch.device; under several processes each takes GPU LOCAL_RANK."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting
    if kind == "cuda" and not torch.cuda.is_available():
        from densepipe.config import ConfigError
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise ConfigError(f"train.device: 'cuda' but {why}; use train.device: auto (a GPU where there "
                          f"is one) or cpu")
    ctx = current()
    return torch.device(kind, ctx.local_rank) if kind == "cuda" and ctx.active else torch.device(kind)


@contextmanager
def process_group(device_setting: str):
    """Joins the job's process group when a launcher started several processes (gloo on
    CPU, nccl on GPU) and leaves it on the way out, errors included. Yields the Context."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1 or dist.is_initialized():
        yield current()
        return
    kind = device(device_setting).type
    extra = {}
    if kind == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
        extra["device_id"] = local
    dist.init_process_group(BACKENDS[kind], **extra)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """The module that runs forward/backward: DistributedDataParallel when several ranks."""
    if not current().active:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


# ------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class Shard:
    """One rank's part of every epoch, fixed for a fit (the permutation changes, positions do not)."""
    positions: Tensor               # (local rows,) positions in the epoch's permutation, step after step
    bounds: list[tuple[int, int]]   # per global step: this rank's slice of `positions`
    step_rows: list[int]            # per global step: its rows on all ranks together


def shard(n: int, batch_size: int, rank: int = 0, world: int = 1, device=None) -> Shard:
    pos = torch.arange(n, device=device)
    step_rows = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    counts = [len(range(rank, rows, world)) for rows in step_rows]  # rank r: offsets r, r+world, ...
    ends = list(itertools.accumulate(counts))
    return Shard(pos[(pos % batch_size) % world == rank],
                 [(end - c, end) for c, end in zip(counts, ends, strict=True)], step_rows)


def block(n: int, rank: int = 0, world: int = 1) -> tuple[int, int]:
    """Rank r's contiguous rows [start, stop) of n (validation: sums do not care about order)."""
    return n * rank // world, n * (rank + 1) // world


# ---------------------------------------------------------------- collectives
def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor summed over the ranks, all in one collective; unchanged in one process."""
    if not current().active:
        return tensors
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    parts = flat.split([t.numel() for t in tensors])
    return [p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, tensors, strict=True)]


def barrier() -> None:
    """Every rank waits here for the others (none to wait for in one process)."""
    if current().active:
        dist.barrier()


def from_main(obj):
    """Rank 0's object on every rank (the resume state: other machines need not hold the file)."""
    if not current().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------- launch
def argv(args) -> list[str]:
    """A parsed command line back as options (--key value; lists as repeated options)."""
    out = []
    for key, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                out += [f"--{key.replace('_', '-')}", str(v)]
    return out


def launch(command: list[str], nproc: int) -> None:
    """Runs `python -m densepipe <command>` in nproc local processes through torch's launcher
    (`torchrun --standalone --nproc-per-node nproc`) and waits. Raises WorkerFailure naming
    the failed ranks when one fails: the launcher then stops the others."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    share_cores(os.environ, nproc)
    sys.stdout.flush()
    # "--" ends torchrun's own options: it would read `--run` as an abbreviation of its `--run-path`.
    launcher = ["--standalone", f"--nproc-per-node={nproc}", "--module", "densepipe", "--"]
    try:
        run(parse_args([*launcher, *command]))
    except ChildFailedError as err:
        raise WorkerFailure(describe_failures(err.failures)) from None


def describe_failures(failures: dict) -> str:
    """{rank: ProcessFailure} as one line: which rank failed first, its process, how it ended.
    Ranks that ended by SIGTERM were stopped by the launcher after the failure."""
    stopped = {r for r, f in failures.items() if f.signal_name() == "SIGTERM"}
    causes = sorted(set(failures) - stopped) or sorted(stopped)
    parts = []
    for rank in causes:
        f = failures[rank]
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
        parts.append(f"rank {rank} (pid {f.pid}) {how}")
    others = sorted(set(failures) - set(causes))
    tail = f"; the launcher then stopped rank(s) {', '.join(map(str, others))}" if others else ""
    return "distributed training failed: " + "; ".join(parts) + tail
