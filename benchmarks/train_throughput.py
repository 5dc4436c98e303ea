"""Epoch cost of standard, IBP-certified and PGD-10 training, measured in the same run (targets: IBP ≤ 3×, PGD-10 ≤ 12×
a standard epoch), and of the state-of-the-art certified-training objectives with 10 attack steps (SABR, TAPS,
STAPS, MTL-IBP, EXP-IBP, CC-IBP, and TAPS/STAPS searching 3 classes; target ≤ 1.2× a PGD-10 epoch).

    python benchmarks/train_throughput.py [--root ../shared/data/mnist] [--n 2048] [--reps 3] [--threads 2] [--warmup 1]
    python benchmarks/train_throughput.py --device cuda --objectives standard,ibp,crown-ibp,pgd-10
    python benchmarks/train_throughput.py --objectives sota      # pgd-10 and the six objectives

Uses MNIST from --root when present (else random 28×28 images), wong-small, batch 128, ℓ∞ ε = 0.1. Each objective's
epoch runs ``reps`` times, interleaved (one round = one epoch of each); the script prints both the ratio of the
fastest epochs and the median of the per-round ratios (robust to the machine's speed drifting between rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from certlab import runtime

MEMORY = runtime.tune_for_script()  # the certlab command's memory settings, before torch loads (--no-tune: defaults)

import torch  # noqa: E402

from certlab import data as cdata
from certlab import models
from certlab.train import TrainConfig
from certlab.train.loop import batches
from certlab.train.objectives import OBJECTIVES, StepContext
from certlab.train.setup import make_optimizer
from certlab.train.threats import ThreatMaker

SOTA = ("sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")


def load(root, n):
    if root and os.path.isdir(root):
        ds = cdata.load("mnist", "train", root=root, download=False)
        return ds.x[:n], ds.y[:n], ds.info
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), cdata.info("mnist")


def epoch(model, opt, x, y, cfg, maker, seed):
    model.train()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    f = OBJECTIVES[cfg.objective]
    for i, idx in enumerate(batches(torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)),
                                    cfg.batch_size)):
        ctx = StepContext(cfg, maker, cfg.eps, 0.0, 1.0, 100.0, seed=i)
        loss, _ = f(model, x[idx], y[idx], ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:  # CUDA launches are asynchronous: wait for the epoch's kernels
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join("..", "shared", "data", "mnist"),
                    help="MNIST folder (default ../shared/data/mnist, relative to the working directory)")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--objectives", default="standard,ibp,pgd-10",
                    help="comma list from standard, ibp, crown-ibp, pgd-10, sabr-10, taps-10, staps-10, mtl-ibp-10, "
                         "exp-ibp-10, cc-ibp-10, taps-10-k3, staps-10-k3 (taps_targets 3), or 'sota' for pgd-10 "
                         "and the last eight (standard is always run: the baseline)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    ap.add_argument("--no-tune", action="store_true", help="keep the allocator's defaults (see certlab.runtime)")
    args = ap.parse_args(argv)
    print(f"memory settings (certlab.runtime): {MEMORY}")
    torch.set_num_threads(args.threads)
    x, y, info = load(args.root, args.n)
    x, y = x.to(args.device), y.to(args.device)
    configs = {
        "standard": TrainConfig(dataset="mnist", model="wong-small", objective="standard", eps=0.1, batch_size=128),
        "ibp": TrainConfig(dataset="mnist", model="wong-small", objective="certified", relaxation="ibp", eps=0.1,
                           batch_size=128),
        "crown-ibp": TrainConfig(dataset="mnist", model="wong-small", objective="certified", relaxation="crown-ibp",
                                 eps=0.1, batch_size=128),
        "pgd-10": TrainConfig(dataset="mnist", model="wong-small", objective="pgd", attack="pgd", attack_steps=10,
                              eps=0.1, batch_size=128),
    }
    for name in SOTA:  # the same attack (PGD, 10 steps) as pgd-10; TAPS's latent search takes 10 steps too
        configs[f"{name}-10"] = TrainConfig(dataset="mnist", model="wong-small", objective=name, attack="pgd",
                                            attack_steps=10, eps=0.1, batch_size=128)
    for name in ("taps", "staps"):  # the latent search over the 3 most violated classes only (taps_targets: 3)
        configs[f"{name}-10-k3"] = configs[f"{name}-10"].replace(taps_targets=3)
    wanted = {"standard"} | {o for o in args.objectives.split(",") if o and o != "sota"}
    if "sota" in args.objectives.split(","):
        wanted |= {"pgd-10"} | {f"{name}-10" for name in SOTA} | {"taps-10-k3", "staps-10-k3"}
    unknown = wanted - set(configs)
    if unknown:
        ap.error(f"unknown objective(s) {sorted(unknown)}; choose from {sorted(configs)}")
    configs = {k: c for k, c in configs.items() if k in wanted}
    maker = ThreatMaker("linf", "mnist", info)
    runs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = models.build("wong-small", (1, 28, 28), 10, normalize=(info.mean, info.std)).to(args.device)
        runs[name] = (model, make_optimizer(cfg, model.parameters()), cfg)  # what certlab train uses
    times = {k: [] for k in runs}
    for r in range(-args.warmup, args.reps):  # one round = one epoch of each objective, back to back
        for name, (model, opt, cfg) in runs.items():
            t = epoch(model, opt, x, y, cfg, maker, r)
            if r >= 0:  # warm-up rounds (first-call allocations, the attacks' one-off kernel timing) are not counted
                times[name].append(t)
    print(f"train throughput: wong-small, MNIST-shaped, n={args.n}, batch 128, device {args.device}, "
          f"threads={torch.get_num_threads()}, {args.reps} rounds")
    print("  'best': fastest epoch of each objective, divided; 'per round': the ratio within each round (the machine's")
    print("  speed changes between rounds, not within one), median [min, max] over the rounds")
    pgd = times.get("pgd-10")
    print(f"{'objective':<12} {'best s':>7} {'x std (best)':>13} {'x std per round: median [min, max]':>36} "
          f"{'x pgd-10 per round: median [min, max]':>38} {'target':>16}")
    targets = {"standard": "", "ibp": "<= 3 x std", "crown-ibp": "", "pgd-10": "<= 12 x std",
               **{f"{name}-10": "<= 1.2 x pgd-10" for name in SOTA},
               "taps-10-k3": "<= 1.2 x pgd-10", "staps-10-k3": "<= 1.2 x pgd-10"}

    def spread(ts, base):
        rounds = sorted(t / s for t, s in zip(ts, base))
        return f"{statistics.median(rounds):.2f} [{rounds[0]:.2f}, {rounds[-1]:.2f}]"

    std = times["standard"]
    for name, ts in times.items():
        print(f"{name:<12} {min(ts):7.2f} {min(ts) / min(std):13.2f} {spread(ts, std):>36} "
              f"{spread(ts, pgd) if pgd else '':>38} {targets[name]:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
