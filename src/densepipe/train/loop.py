"""The training loop: mini-batches from tensors already on the device, one
permutation per epoch, one host sync per epoch, a reused batch buffer.

Diverging training (a non-finite loss) is noticed at the epoch's sync: each
step's loss stays on the device until then, the first non-finite one names the
bad batch, the weights of the last good epoch are put back, and the user is told
which epoch and batch went wrong.

Under torchrun the same loop runs on every rank (see train/distributed.py): each
trains on its shard of every global batch, DistributedDataParallel averages the
gradients, and the epoch's sums (losses, metric statistics, each step's loss) are
added up over the ranks in one collective just before the epoch's host sync.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from densepipe.config import ConfigError
from densepipe.metrics import METRICS, labels_from_raw
from densepipe.nn.losses import LOSSES, weighted_sum
from densepipe.registry import did_you_mean
from densepipe.train import distributed
from densepipe.train.callbacks import TerminateOnNaN, build_callbacks
from densepipe.train.direct import DirectStep
from densepipe.train.history import History
from densepipe.train.optimizers import build_optimizer
from densepipe.train.progress import make_progress

EVAL_CHUNK = 8192  # rows per forward pass when scoring a whole split
WALL_CLOCK = ("epoch_seconds", "samples_per_sec")  # differ between ranks: logged, never decided on
_LOG_NAMES = {"learning_rate": "lr"}  # Keras 3's log key -> ours, for the hint on an unknown monitor


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""


@dataclass
class Split:
    inputs: dict[str, Tensor]     # input name -> (N, features)
    targets: dict[str, Tensor]    # target name -> (N,) class ids or (N, d) values

    @property
    def n(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def to(self, device) -> Split:
        return Split({k: v.to(device) for k, v in self.inputs.items()},
                     {k: v.to(device) for k, v in self.targets.items()})

    def rows(self, start: int, stop: int) -> Split:
        return Split({k: v[start:stop] for k, v in self.inputs.items()},
                     {k: v[start:stop] for k, v in self.targets.items()})


def batch_buffers(data: Split, shard: distributed.Shard) -> dict[str, Tensor]:
    """Input name -> (largest step, features): allocated once per fit, every step gathers its
    rows into it (this rank's rows only)."""
    widest = max(hi - lo for lo, hi in shard.bounds)
    return {k: v.new_empty((widest, *v.shape[1:])) for k, v in data.inputs.items()}


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global generator (dropout, noise) for one epoch on one rank: ranks draw
    different masks, and a resumed run draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(1)[0])


class Trainer:
    def __init__(self, model, cfg, *, seed: int = 0, class_weights: dict[str, Tensor] | None = None,
                 target_units: dict[str, tuple[float, float]] | None = None,
                 save_model=None, save_checkpoint=None, log=print):
        """cfg: config.TrainConfig. target_units: (center, scale) per scaled regression target, so
        metrics are in the target's own units (the loss stays in the units the model trains on).
        save_model(epoch) writes the model file with the weights after that epoch, counted from 1
        (checkpoint callback); save_checkpoint(state) writes the resume checkpoint."""
        self.cfg, self.model, self.seed = cfg, model, seed
        self.dist = distributed.current()
        self.device = distributed.device(cfg.device)
        self.model.to(self.device)
        self.net = distributed.wrap(model, self.device)  # runs forward/backward; DDP under torchrun
        self.optimizer = build_optimizer(model.parameters(), cfg.optimizer)
        self.base_lr = cfg.optimizer.lr
        self.callbacks = build_callbacks(cfg.callbacks)
        self.class_weights = {k: v.to(self.device) for k, v in (class_weights or {}).items()}
        self.target_units = dict(target_units or {})
        self._save_model, self._save_checkpoint = save_model, save_checkpoint
        self.log = log if self.dist.main else (lambda msg: None)  # rank 0 speaks for the job
        self.history = History()
        self.epochs, self.start_epoch = cfg.epochs, 0
        self.stop, self.stop_reason = False, None
        self.restored_epoch: int | None = None  # set when a callback put an earlier epoch's weights back
        self.saved_epoch: int | None = None     # the epoch whose weights a callback last wrote to the model file
        self.saved_weights: dict | None = None  # ... and those weights, kept for a resume that lost the file
        self.shuffle_gen = torch.Generator(device=self.device).manual_seed(seed)
        torch.manual_seed(seed)  # dropout and noise layers draw from the global generator
        self.dense_names = list(model.dense_layers())
        self.direct = DirectStep.build(model, self.device, self.dist.world)  # None: autograd's steps

    def _seed_global_rng(self, seed: int) -> None:
        # Only the generator the model's dropout / noise layers draw from: torch.manual_seed
        # would also queue seeds for every accelerator backend, at a cost each epoch.
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    # ------------------------------------------------------------ callback services
    def request_stop(self, reason: str) -> None:
        self.stop, self.stop_reason = True, reason

    def scheduled_lr(self, epoch: int, leave_out=None) -> float:
        """The epoch's lr: the base lr times every schedule's factor (but `leave_out`'s)."""
        lr = self.base_lr
        for cb in self.callbacks:
            if cb is not leave_out:
                lr *= cb.lr_factor(epoch)
        return lr

    def weights_copy(self) -> dict:
        # Taken every epoch (the divergence guard's fallback): a tensor clone each, not a deepcopy.
        return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
                for k, v in self.model.state_dict().items()}

    def load_weights(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def save_model(self, epoch: int) -> None:
        if self._save_model is not None:
            self._save_model(epoch + 1)
            self.saved_epoch, self.saved_weights = epoch, self.weights_copy()

    # -------------------------------------------------------------------- resume
    def state_dict(self, epoch: int) -> dict:
        saved = self.saved_weights
        if saved is not None and all(torch.equal(saved[k], v) for k, v in self.model.state_dict().items()):
            saved = None  # the weights of the model file are the model's own (its latest epoch): kept once
        return {
            "epoch": epoch,  # epochs completed
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "history": self.history.records,
            "shuffle_rng": self.shuffle_gen.get_state(),  # the global generator is seeded per epoch
            "saved_epoch": self.saved_epoch,
            "saved_weights": saved,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for cb, s in zip(self.callbacks, state["callbacks"], strict=True):
            cb.load_state_dict(s)
        self.history.records = list(state["history"])
        self.shuffle_gen.set_state(state["shuffle_rng"])
        self.start_epoch = int(state["epoch"])
        self.saved_epoch, self.saved_weights = state.get("saved_epoch"), state.get("saved_weights")
        if self.saved_epoch is not None and self.saved_weights is None:  # stored once, as the model's
            self.saved_weights = self.weights_copy()

    # ------------------------------------------------------------------- losses
    def _loss_sums(self, raw: dict[str, Tensor], targets: dict[str, Tensor],
                   weighted: bool = True) -> tuple[Tensor, list[Tensor]]:
        """Sums over the rows (total and per output): they add up over steps and ranks. The total
        also holds the activity penalties of the forward pass that made `raw` (the model's
        latest), as Keras' loss holds its layers' added losses.
        weighted: with the class weights, which (as Keras') shape training only."""
        per_sample = {name: LOSSES[head.loss](raw[name], targets[head.target], head.activation, **head.loss_params)
                      for name, head in self.model.heads.items()}
        weights = self._row_weights(targets) if weighted else dict.fromkeys(self.model.heads)
        return self._totals(per_sample, weights)

    def _totals(self, per_sample: dict[str, Tensor],
                row_weights: dict[str, Tensor | None]) -> tuple[Tensor, list[Tensor]]:
        """_loss_sums from each output's per-row losses and row weights (None: all 1)."""
        parts, total = [], None
        for name, head in self.model.heads.items():
            part = weighted_sum(per_sample[name], row_weights[name])
            parts.append(part)
            weighted_part = part if head.weight == 1.0 else head.weight * part
            total = weighted_part if total is None else total + weighted_part
        if self.model.activity is not None:
            total = total + self.model.activity
        return total, parts

    def _row_weights(self, targets: dict[str, Tensor]) -> dict[str, Tensor | None]:
        """Per output, each row's class weight for its loss; None without class weights."""
        weights = {}
        for name, head in self.model.heads.items():
            table = self.class_weights.get(head.target)
            weights[name] = None if table is None else table[targets[head.target].reshape(-1).long()]
        return weights

    def _metric_stats(self, raw, targets) -> list[Tensor]:
        out = []
        for name, head in self.model.heads.items():
            scores, target = raw[name].detach(), targets[head.target]
            pred = scores if labels_from_raw(head.activation, head.metrics, scores) else head.apply(scores)
            if head.target in self.target_units:  # back to the user's units, as the test metrics are
                center, scale = self.target_units[head.target]
                pred, target = pred * scale + center, target * scale + center
            out += [METRICS[m].stats(pred, target) for m in head.metrics]
        return out

    def _log_names(self) -> list[tuple[str, str, str]]:
        """(log key, output name, metric) for every metric, Keras-style prefixes when several outputs."""
        many = len(self.model.heads) > 1
        return [(f"{name}_{m}" if many else m, name, m)
                for name, head in self.model.heads.items() for m in head.metrics]

    def _finish(self, stats: list[Tensor]) -> list[Tensor]:
        names = self._log_names()
        return [METRICS[m].finish(s) for (_, _, m), s in zip(names, stats, strict=True)]

    # --------------------------------------------------------------------- epochs
    def _permutation(self, n: int) -> Tensor:
        return (torch.randperm(n, generator=self.shuffle_gen, device=self.device) if self.cfg.shuffle
                else torch.arange(n, device=self.device))

    def _train_epoch(self, data: Split, batch: dict[str, Tensor], shard: distributed.Shard):
        """One pass over this rank's share of `data`. Per step it only keeps what it logs (loss sums,
        gradient norms, the raw outputs) as device tensors; the epoch's sums are formed at the end,
        still on the device. Returns [loss sums (total, each output), each step's loss total, *metric
        statistics] and gradient norms."""
        self.net.train()
        dense = [self.model.layers[n].weight for n in self.dense_names]
        order = self._permutation(data.n).index_select(0, shard.positions)  # (rows,) this rank's, by step
        direct = self.direct.plan() if self.direct is not None and self.direct.usable() else None
        like = next(iter(data.inputs.values()))
        # DDP averages over ranks, so world / rows makes the gradient the global step's mean.
        scale_of = {rows: self.dist.world / rows for rows in shard.step_rows}  # two at most: full, last step
        seed_of = {rows: torch.tensor(scale, dtype=like.dtype, device=like.device) for rows, scale in scale_of.items()}
        seeds = [seed_of[rows] for rows in shard.step_rows]  # backward's seed gradient per step
        if direct is not None and direct.runs_epochs(dense):  # the steps without Python between them
            log, outputs = direct.epoch(data, order, batch, shard.bounds, seeds, self.class_weights, self._update)
        else:
            scales = [scale_of[rows] for rows in shard.step_rows]
            log, outputs = self._steps(data, order, batch, shard.bounds, seeds, scales, dense, direct)
        log = log.double()                                         # (steps, 1 + outputs + dense layers)
        # Each step's outputs came from the weights before its update, as Keras' running metrics.
        targets = {k: v.index_select(0, order) for k, v in data.targets.items()}
        stats = self._metric_stats(outputs, targets)
        sums = 1 + len(self.model.heads)                           # loss sums per step: total, each output
        loss_sums = log[:, :sums].sum(0)                           # (1 + outputs,)
        grad_norms = log[:, sums:].square().mean(0).sqrt()         # RMS over steps; equal on all ranks
        # (steps,): summed over the ranks it is non-finite where any rank's is, so the host finds
        # the first bad step in it after the epoch's one sync, with no more work on the device.
        step_losses = log[:, 0]
        return [loss_sums, step_losses, *stats], grad_norms

    def _steps(self, data: Split, order: Tensor, batch: dict[str, Tensor], bounds: list[tuple[int, int]],
               seeds: list[Tensor], scales: list[float], dense: list[Tensor],
               direct) -> tuple[Tensor, dict[str, Tensor]]:
        """The epoch's steps, one Python call after another: through a DirectStep's plan (`direct`)
        or autograd (None). scales: per step, what its loss total is scaled by; seeds: the same as
        tensors, backward's seed gradient. Returns the steps' log rows (loss sums (total, each
        output), grad norms) and every step's raw outputs, per output name."""
        logged: list[Tensor] = []  # per step: (loss sums (total, each output), grad norms)
        outputs: dict[str, list[Tensor]] = {name: [] for name in self.model.heads}  # per step: raw outputs
        reused = {b.untyped_storage().data_ptr() for b in batch.values()}
        zero = dense[0].new_zeros(()) if dense else None  # the gradient norm of a frozen layer
        for (lo, hi), seed, scale in zip(bounds, seeds, scales, strict=True):
            idx = order[lo:hi]
            xb = {k: torch.index_select(v, 0, idx, out=batch[k][:hi - lo]) for k, v in data.inputs.items()}
            yb = {k: v.index_select(0, idx) for k, v in data.targets.items()}
            self.optimizer.zero_grad()
            if direct is not None:  # the same gradients, without autograd (see train/direct.py)
                row_weights = self._row_weights(yb)
                raw, per_sample = direct.grads(xb, yb, seed, row_weights)
                total, parts = self._totals(per_sample, row_weights)
                penalty = direct.penalty_grads()
            else:
                raw = self.net(xb)  # a rank with no rows in this step still runs it: DDP needs every rank
                total, parts = self._loss_sums(raw, yb)
                penalty = self.model.penalty()
                # backward returns after DDP's gradient all-reduce.
                if penalty is None:  # the scale as backward's seed gradient: no multiply node to run
                    total.backward(seed)
                else:
                    (total * scale + penalty).backward()
            # Norms of the gradients as backward made them, before clipping rescales them: they are
            # what shows a user exploding or vanishing gradients.
            norms = torch._foreach_norm([zero if w.grad is None else w.grad for w in dense]) if dense else []
            self._update()
            # Kept, not copied into epoch buffers: one stack per step, one cat per epoch is cheaper.
            with torch.no_grad():
                # The logged loss carries the penalty too, as Keras' does: row-weighted, like the data loss.
                # Non-finite exactly when the objective is: the divergence guard watches it.
                total = total.detach() if penalty is None else total + penalty * (hi - lo)
                logged.append(torch.stack([total, *parts, *norms]))
            for name, r in raw.items():
                kept = r.detach().flatten(1)
                # An output can be the gathered batch itself (an identity path from an input),
                # which the next step overwrites: that one is copied.
                outputs[name].append(kept.clone() if kept.untyped_storage().data_ptr() in reused else kept)
        return torch.stack(logged), {k: torch.cat(v) for k, v in outputs.items()}

    def _update(self) -> None:
        """A step's update once its gradients are set: clipping, the optimizer, the weights' constraints."""
        self._clip()
        self.optimizer.step()
        if self.model.constrained:  # as Keras: each update is followed by the weights' constraints
            self.model.apply_constraints()

    def _clip(self) -> None:
        clip = self.cfg.clip
        if clip.value is None and clip.norm is None:
            return
        from densepipe.optim import clip_grad_norm_, clip_grad_value_
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip.value is not None:
            clip_grad_value_(params, clip.value)
        if clip.norm is not None:
            clip_grad_norm_(params, clip.norm)

    @torch.no_grad()
    def _eval_sums(self, data: Split) -> list[Tensor]:
        """[loss sums (total, each output), *metric statistics] over a split: one pass, no sync."""
        self.model.eval()
        n_out = len(self.model.heads)
        loss_sum = torch.zeros(n_out + 1, device=self.device, dtype=torch.float64)
        stats = None
        for start in range(0, max(data.n, 1), EVAL_CHUNK):  # an empty shard still gives (zero) statistics
            part = data.rows(start, start + EVAL_CHUNK)
            raw = self.model(part.inputs)
            total, parts = self._loss_sums(raw, part.targets, weighted=False)
            loss_sum += torch.stack([total, *parts]).double()
            s = self._metric_stats(raw, part.targets)
            stats = s if stats is None else [a + c for a, c in zip(stats, s, strict=True)]
        penalty = self.model.penalty()
        if penalty is not None:  # in the total, as in training: val_loss compares with loss
            loss_sum[0] += penalty.double() * data.n
        return [loss_sum, *stats]

    def evaluate(self, data: Split) -> tuple[Tensor, list[Tensor]]:
        """Loss per output (and total) and metric values on a whole split: one pass, no sync."""
        loss_sum, *stats = self._eval_sums(data)
        return loss_sum / data.n, self._finish(stats)

    def _logs(self, prefix: str, losses: list[float], metrics: list[float]) -> dict:
        logs = {f"{prefix}loss": losses[0]}
        if len(self.model.heads) > 1:
            heads = zip(self.model.heads, losses[1:], strict=True)
            logs.update({f"{prefix}{name}_loss": v for name, v in heads})
        logs.update({f"{prefix}{key}": v for (key, _, _), v in zip(self._log_names(), metrics, strict=True)})
        return logs

    def _decided_keys(self, with_val: bool) -> list[str]:
        """The log keys callbacks see after each epoch (all but the wall-clock ones)."""
        losses, metrics = [0.0] * (1 + len(self.model.heads)), [0.0] * len(self._log_names())
        keys = [*self._logs("", losses, metrics), *(self._logs("val_", losses, metrics) if with_val else ())]
        return [*keys, "lr", *(f"grad_norm/{n}" for n in self.dense_names)]

    def _check_monitors(self, with_val: bool) -> None:
        """A callback watching a value that training never logs would fail after the first
        epoch's work: refused before it, with what is logged."""
        logged = self._decided_keys(with_val)
        for i, cb in enumerate(self.callbacks):
            monitor = getattr(cb.args, "monitor", None)
            if monitor is None:
                continue
            if monitor not in logged:
                ours = _LOG_NAMES.get(monitor)
                why = (" (there is no validation data: split.val_size is 0)"
                       if monitor.startswith("val_") and not with_val
                       else f" (did you mean '{ours}'? that is its name here)" if ours in logged
                       else did_you_mean(monitor, logged))
                raise ConfigError(f"train.callbacks[{i}].monitor: '{monitor}' is not logged{why}; "
                                  f"logged: {', '.join(logged)}")
            if cb.mon.mode is None:
                raise ConfigError(f"train.callbacks[{i}].mode: 'auto' cannot tell whether '{monitor}' should "
                                  f"go down or up; set mode: min or mode: max")

    # ------------------------------------------------------------------------ fit
    def fit(self, train: Split, val: Split | None = None) -> History:
        if train.n == 0:
            raise ValueError("fit: the training split has no rows")
        val = val if val is not None and val.n > 0 else None  # an empty split validates nothing
        self._check_monitors(val is not None)
        train = train.to(self.device)
        val = val.to(self.device) if val is not None else None
        rank, world = self.dist.rank, self.dist.world
        shard = distributed.shard(train.n, self.cfg.batch_size, rank, world, self.device)
        val_part = val.rows(*distributed.block(val.n, rank, world)) if val is not None else None
        batch = batch_buffers(train, shard)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        terminate_quietly = any(isinstance(cb, TerminateOnNaN) for cb in self.callbacks)
        last_good = self.weights_copy()  # refreshed in place after every good epoch
        live = list(self.model.state_dict().values())  # views of the weights that training updates in place
        noisy = self.model.draws_noise
        progress = make_progress(self.cfg.progress if self.dist.main else "quiet", self.epochs, self.log)
        for epoch in range(self.start_epoch, self.epochs):
            lr = self.scheduled_lr(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            if noisy:  # numpy's seed derivation costs a small model's epoch several percent
                self._seed_global_rng(epoch_seed(self.seed, epoch, rank))
            train_sums, grad_norms = self._train_epoch(train, batch, shard)
            val_sums = self._eval_sums(val_part) if val is not None else []
            # The epoch's one collective: each rank's sums added up over the ranks (none in one process).
            summed = distributed.all_reduce_sum(train_sums + val_sums)
            (loss_sums, step_losses, *stats), val_summed = summed[:len(train_sums)], summed[len(train_sums):]
            losses, metrics = loss_sums / train.n, self._finish(stats)
            val_losses, val_metrics = (None, [])
            if val is not None:
                val_losses, val_metrics = val_summed[0] / val.n, self._finish(val_summed[1:])
            # The epoch's one host sync: everything above stayed on the device.
            flat = torch.cat([losses, *[m.reshape(1).double() for m in metrics], grad_norms,
                              step_losses,
                              *([val_losses, *[m.reshape(1).double() for m in val_metrics]]
                                if val is not None else [])]).tolist()
            seconds = time.perf_counter() - t0
            k = len(losses)
            logs = self._logs("", flat[:k], flat[k:k + len(metrics)])
            pos = k + len(metrics)
            norms = flat[pos:pos + len(grad_norms)]
            pos += len(grad_norms)
            steps = flat[pos:pos + len(step_losses)]
            pos += len(step_losses)
            # The epoch's loss (flat[0]) is their sum: finite exactly when every step's is (doubles of
            # float32 values cannot overflow), so the steps are searched only after a bad epoch.
            bad = -1 if math.isfinite(flat[0]) else next(i for i, v in enumerate(steps) if not math.isfinite(v))
            if val is not None:
                logs.update(self._logs("val_", flat[pos:pos + k], flat[pos + k:]))
            if bad >= 0:
                self.load_weights(last_good)
                kept = (f"the weights after epoch {epoch}, the last good one, were restored" if epoch
                        else "no epoch finished, so there are no trained weights to keep")
                msg = (f"training diverged: the loss became NaN/inf at epoch {epoch + 1}, batch {bad + 1}; "
                       f"{kept}. Try a lower learning rate (train.optimizer.lr, now {lr:.3g}), gradient "
                       f"clipping (train.clip.norm: 1.0), or scaling the inputs (scale.numeric: standard).")
                # terminate_on_nan keeps the last good epoch's weights quietly; before the first epoch
                # finished there is none, and the model would be the untrained one: an error then.
                if terminate_quietly and len(self.history):
                    self.log(msg)
                    self.stop_reason = msg
                    break
                raise DivergenceError(msg)
            logs.update({"lr": lr, "epoch_seconds": seconds, "samples_per_sec": train.n / seconds})
            logs.update({f"grad_norm/{n}": v for n, v in zip(self.dense_names, norms, strict=True)})
            self.history.append(epoch, logs)
            progress.epoch(epoch, logs)
            decided = {key: v for key, v in logs.items() if key not in WALL_CLOCK}  # equal on every rank
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, decided)
            torch._foreach_copy_(list(last_good.values()), live)
            done = self.stop or epoch + 1 == self.epochs
            due = (epoch + 1) % self.cfg.checkpoint_every == 0
            if self._save_checkpoint is not None and due and not done:
                self._save_checkpoint(self.state_dict(epoch + 1))
            if self.stop:
                self.log(self.stop_reason)
                break
        for cb in self.callbacks:
            cb.on_train_end(self)
        progress.close()
        return self.history
