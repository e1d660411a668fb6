"""Training speed and accuracy: densepipe's Trainer against the plain PyTorch loop and
scikit-learn's MLPClassifier, side by side in one process on the same data.

Same architecture everywhere: features -> 256 -> 128 -> classes, relu, batch 128,
Adam lr 1e-3, the same number of epochs.
  densepipe  Trainer on the fused kernels (tensors on the device, one permutation and
             one host sync per epoch; on the CPU this one-chain classifier trains without
             autograd's graph, each epoch's steps in one call into the extension: see
             train/direct.py and csrc/chain_epoch.cpp)
  torch      the loop tutorials teach: nn.Sequential(nn.Linear, nn.ReLU, ...),
             DataLoader(TensorDataset, shuffle=True), torch.optim.Adam defaults,
             loss.item() per batch
  sklearn    MLPClassifier(hidden_layer_sizes=(256, 128), solver="adam", batch_size=128,
             learning_rate_init=1e-3, max_iter=epochs, shuffle=True, tol=0,
             n_iter_no_change=epochs + 1), so it runs every epoch
A "GEMMs only" row times just the matrix products every implementation must run per batch
(forward, dX, dW): no training step can go faster, which bounds the ratios any side can reach.
Data: scikit-learn's digits (standard-scaled, stratified 75/25 split) and a synthetic
make_classification set (64 features, `--rows` rows, fewer epochs). samples/s counts
training only (rows x epochs / seconds of fit). Rounds are interleaved (one run of each
side per round) so a load change on a shared machine hits every side alike; the median
round is reported, and with several rounds the range of the per-round ratios after it.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --threads 1 --rows 50000
    python benchmarks/bench_train.py --device cuda   # densepipe and the torch loop on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import densepipe.ops  # noqa: F401  (loads the extension: registers torch.ops.densepipe)
from densepipe import config
from densepipe.nn.model import DataSpec, TargetSpec, build_model
from densepipe.train.loop import Split, Trainer

HIDDEN = (256, 128)   # hidden widths
BATCH = 128           # rows per step
LR = 1e-3             # Adam learning rate
TORCH_GOAL = 1.5      # densepipe / plain torch loop samples/s, at least
SKLEARN_GOAL = 3.0    # densepipe / MLPClassifier samples/s, at least
ACCURACY_POINTS = 0.5  # densepipe's test accuracy at most this many points below a peer's
# Pause before each timed run: OpenMP and OpenBLAS workers spin for a while after their last
# task, and with as many threads as cores they would steal cycles from the next side.
IDLE = 0.5  # seconds


# ------------------------------------------------------------------------- data
def dataset(name: str, rows: int):
    if name == "digits":
        X, y = load_digits(return_X_y=True)
    else:
        X, y = make_classification(n_samples=rows, n_features=64, n_informative=32, n_redundant=8,
                                   n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=0)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    scaler = StandardScaler().fit(Xtr)
    f32 = lambda a: scaler.transform(a).astype(np.float32)  # noqa: E731
    return f32(Xtr), ytr.astype(np.int64), f32(Xte), yte.astype(np.int64)


# ---------------------------------------------------------------------- runners
DEVICE = "cpu"  # densepipe's and the torch loop's device (--device); scikit-learn runs on the CPU


def sync() -> None:
    if DEVICE == "cuda":  # CUDA work is queued: time it once it has run
        torch.cuda.synchronize()


def run_densepipe(Xtr, ytr, Xte, yte, epochs: int, seed: int):
    classes = int(ytr.max()) + 1
    cfg = config.parse({
        "model": {"layers": [{"type": "dense", "units": HIDDEN[0], "activation": "relu"},
                             {"type": "dense", "units": HIDDEN[1], "activation": "relu"},
                             {"type": "dense", "units": "auto", "activation": "auto"}]},
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": {"name": "adam", "lr": LR},
                  "metrics": ["accuracy"], "progress": "quiet", "device": DEVICE},
    })
    spec = DataSpec({"features": Xtr.shape[1]}, {"target": TargetSpec("multiclass", classes)})
    model = build_model(cfg.model, cfg.train, spec, seed=seed)
    trainer = Trainer(model, cfg.train, seed=seed)
    train = Split({"features": torch.from_numpy(Xtr)}, {"target": torch.from_numpy(ytr)})
    t0 = time.perf_counter()
    trainer.fit(train)  # ends with a host sync
    seconds = time.perf_counter() - t0
    pred = model.predict({"features": torch.from_numpy(Xte).to(DEVICE)})["target"].argmax(1).cpu().numpy()
    return seconds, float((pred == yte).mean())


def run_torch(Xtr, ytr, Xte, yte, epochs: int, seed: int):
    torch.manual_seed(seed)
    classes = int(ytr.max()) + 1
    model = nn.Sequential(nn.Linear(Xtr.shape[1], HIDDEN[0]), nn.ReLU(),
                          nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
                          nn.Linear(HIDDEN[1], classes)).to(DEVICE)
    loader = DataLoader(TensorDataset(torch.from_numpy(Xtr), torch.from_numpy(ytr)), batch_size=BATCH,
                        shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        running = 0.0
        for xb, yb in loader:
            xb, yb = xb.to(DEVICE), yb.to(DEVICE)
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            running += loss.item()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(Xte).to(DEVICE)).argmax(1).cpu().numpy()
    return seconds, float((pred == yte).mean())


def run_sklearn(Xtr, ytr, Xte, yte, epochs: int, seed: int):
    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, batch_size=BATCH, solver="adam", learning_rate_init=LR,
                        max_iter=epochs, shuffle=True, n_iter_no_change=epochs + 1, tol=0, random_state=seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is the epoch budget here
        clf.fit(Xtr, ytr)
    seconds = time.perf_counter() - t0
    assert clf.n_iter_ == epochs, f"MLPClassifier stopped after {clf.n_iter_} of {epochs} epochs"
    return seconds, float(clf.score(Xte, yte))


def _products_torch(acts: list[Tensor], weights: list[Tensor]) -> None:
    for i, w in enumerate(weights):
        torch.mm(acts[i], w.T)                           # forward
        torch.mm(acts[i + 1].T, acts[i])                 # dW = g^T x
        if i:
            torch.mm(acts[i + 1], w)                     # dX = g W


def _products_densepipe(acts: list[Tensor], weights: list[Tensor]) -> None:
    """The same products on densepipe's GEMM backend (oneDNN, our AVX-512 kernel or BLAS, see
    csrc/gemm_cpu.cpp), made as training makes them: one chain call forward, one backward (dX
    and dW side by side on 2 threads), with linear, bias-free layers, whose epilogues are empty.
    Calling the products one op at a time would add the Python cost of 6 calls and understate
    the bound."""
    n = len(weights)
    no_bias, linear, alphas = [acts[0].new_empty(0)] * n, ["linear"] * n, [0.0] * n
    with torch._C._AutoDispatchBelowAutograd():  # the kernels alone, as train/direct.py calls them
        y, hidden, preacts = dense_ops.dense_chain_forward(acts[0], weights, no_bias, linear, alphas)
        dense_ops.dense_chain_backward(acts[-1], acts[0], hidden, y, weights, preacts, linear, alphas,
                                       [True] * n, [False] * n, False)


def run_gemm_bound(Xtr, ytr, Xte, yte, epochs: int, seed: int):
    """Only the GEMMs any implementation must run per batch (forward x W^T, backward dX and
    dW for each layer, no dX for the inputs), on whichever of torch.mm and densepipe's GEMM
    backend is faster here: an upper bound on samples/s, not a peer."""
    gen = torch.Generator().manual_seed(seed)
    widths = [Xtr.shape[1], *HIDDEN, int(ytr.max()) + 1]
    acts = [torch.randn(BATCH, w, generator=gen).to(DEVICE) for w in widths]  # (B, width) per layer
    pairs = zip(widths, widths[1:], strict=False)
    weights = [torch.randn(o, i, generator=gen).to(DEVICE) for i, o in pairs]  # (out, in) per layer
    steps = -(-len(Xtr) // BATCH) * epochs
    best = float("inf")
    for products in (_products_torch, _products_densepipe):
        time.sleep(IDLE)
        t0 = time.perf_counter()
        for _ in range(steps):
            products(acts, weights)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, float("nan")


dense_ops = torch.ops.densepipe
RUNNERS = {"densepipe": run_densepipe, "torch": run_torch, "sklearn": run_sklearn}


# ---------------------------------------------------------------------- driver
def bench(name: str, rows: int, epochs: int, rounds: int) -> dict:
    Xtr, ytr, Xte, yte = dataset(name, rows)
    warm = min(len(Xtr), 2048)  # allocator, BLAS and kernel warm-up, not timed
    for run in (run_densepipe, run_torch):
        run(Xtr[:warm], ytr[:warm], Xte[:warm], yte[:warm], 1, 0)
    times: dict[str, list[float]] = {k: [] for k in RUNNERS}
    accs: dict[str, list[float]] = {k: [] for k in RUNNERS}
    for r in range(rounds):
        for side, run in RUNNERS.items():
            time.sleep(IDLE)
            seconds, acc = run(Xtr, ytr, Xte, yte, epochs, seed=r)
            times[side].append(seconds)
            accs[side].append(acc)
    samples = len(Xtr) * epochs
    time.sleep(IDLE)
    bound = len(Xtr) * epochs / run_gemm_bound(Xtr, ytr, Xte, yte, epochs, 0)[0]
    return {"data": name, "rows": len(Xtr), "epochs": epochs, "gemm_bound": bound,
            "speed": {k: samples / statistics.median(v) for k, v in times.items()},
            "round_speeds": {k: [samples / t for t in v] for k, v in times.items()},
            "accuracy": {k: statistics.mean(v) for k, v in accs.items()}}


def report(results: list[dict]) -> bool:
    print(f"\n{'data':<10} {'train rows':>10} {'epochs':>6}  {'side':<10} {'samples/s':>11} {'test acc':>9}")
    for res in results:
        for side in RUNNERS:
            print(f"{res['data']:<10} {res['rows']:>10,} {res['epochs']:>6}  {side:<10} "
                  f"{res['speed'][side]:>11,.0f} {100 * res['accuracy'][side]:>8.2f}%")
        print(f"{res['data']:<10} {res['rows']:>10,} {res['epochs']:>6}  {'GEMMs only':<10} "
              f"{res['gemm_bound']:>11,.0f}  (bound: the matrix products alone)")
    print(f"\n{'data':<10} {'dp/torch':>9} {'dp/sklearn':>11} {'bound/sklearn':>14} {'acc dp-torch':>13} "
          f"{'acc dp-sklearn':>15}  goals")
    ok = True
    for res in results:
        s, a = res["speed"], res["accuracy"]
        r_torch, r_sk = s["densepipe"] / s["torch"], s["densepipe"] / s["sklearn"]
        d_torch, d_sk = 100 * (a["densepipe"] - a["torch"]), 100 * (a["densepipe"] - a["sklearn"])
        flags = [f"{'ok' if r_torch >= TORCH_GOAL else 'MISS'} >={TORCH_GOAL}x torch",
                 f"{'ok' if r_sk >= SKLEARN_GOAL else 'MISS'} >={SKLEARN_GOAL}x sklearn",
                 f"{'ok' if min(d_torch, d_sk) >= -ACCURACY_POINTS else 'MISS'} accuracy within "
                 f"{ACCURACY_POINTS} points"]
        ok &= all(f.startswith("ok") for f in flags)
        r_bound = res["gemm_bound"] / s["sklearn"]  # the most any side could reach against scikit-learn
        print(f"{res['data']:<10} {r_torch:>8.2f}x {r_sk:>10.2f}x {r_bound:>13.2f}x {d_torch:>+12.2f}p "
              f"{d_sk:>+14.2f}p  " + "; ".join(flags))
    # Rounds ran interleaved, so each round's ratio compares sides under the same load: their
    # spread shows how far a single run could land from the medians above on this machine.
    for res in results:
        per = res["round_speeds"]
        if len(per["densepipe"]) > 1:
            spread = {peer: sorted(dp / other for dp, other in zip(per["densepipe"], per[peer], strict=True))
                      for peer in ("torch", "sklearn")}
            print(f"{res['data']:<10} round by round ({len(per['densepipe'])} rounds): " + ", ".join(
                f"dp/{peer} {r[0]:.2f}x to {r[-1]:.2f}x" for peer, r in spread.items()))
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20, help="epochs on digits")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the synthetic set (0: skip it)")
    p.add_argument("--big-epochs", type=int, default=3, help="epochs on the synthetic set")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds on digits (median reported)")
    p.add_argument("--big-rounds", type=int, default=3, help="interleaved rounds on the synthetic set")
    p.add_argument("--threads", type=int, default=0, help="threads for torch and BLAS (0: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device of densepipe and the torch loop (scikit-learn has only the CPU)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}, {threads} thread(s) for torch and scikit-learn's BLAS; "
          f"{HIDDEN[0]}-{HIDDEN[1]} relu MLP, batch {BATCH}, Adam lr {LR}")
    with threadpool_limits(limits=threads):  # numpy's BLAS (scikit-learn) gets the same threads
        results = [bench("digits", 0, args.epochs, args.rounds)]
        if args.rows:
            results.append(bench("synthetic", args.rows, args.big_epochs, args.big_rounds))
    ok = report(results)
    print("\nall goals met" if ok else "\nsome goals missed (see MISS above)")


if __name__ == "__main__":
    main()
