"""Bound cost on a trained model: time per batch of each relaxation against a forward pass, and how many neurons
the back-substituting relaxations had to bound, on test images of a run directory's model.

    python benchmarks/trained_bounds.py RUN_DIR [--eps 0.1] [--norm linf] [--methods ibp,crown-ibp,fastlin,crown]
                                        [--batch 64] [--reps 3] [--threads 1] [--which last]

Random weights (benchmarks/bounds.py) make almost every ReLU unstable; trained models do not, and the cost of
CROWN, Fast-Lin and α-CROWN depends on how many neurons are left unstable by the interval bounds each layer starts
from. Per ReLU layer the script prints the mean and the per-batch maximum (what sets the number of rows
back-substituted) of unstable neurons: under plain IBP, under IBP propagated from the refined bounds of the earlier
layers (the reference `backsub.intermediate` uses), and after refinement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from certlab import runtime

MEMORY = runtime.tune_for_script()  # the certlab command's memory settings, before torch loads

import torch  # noqa: E402

import certlab  # noqa: E402
from certlab.bounds import backsub  # noqa: E402
from certlab.bounds.core import build_graph  # noqa: E402
from certlab.bounds.ibp import interval_pass  # noqa: E402
from certlab.errors import CertlabError  # noqa: E402
from certlab.train.run import load_run  # noqa: E402
from certlab.train.setup import load_data  # noqa: E402
from certlab.train.threats import ThreatMaker  # noqa: E402


def _timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _unstable(bounds):
    l, u = bounds
    c = ((l < 0) & (u > 0)).flatten(1).sum(1)
    return f"{c.float().mean().item():.1f} / {int(c.max())}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--norm", default=None, help="default: the run's")
    ap.add_argument("--methods", default="ibp,crown-ibp,fastlin,crown")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--which", default="last", choices=("best", "last"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        if not (a.eps >= 0 and a.batch > 0 and a.reps > 0):
            raise CertlabError(f"--eps must be >= 0 and --batch, --reps positive (got {a.eps}, {a.batch}, {a.reps})")
        model, cfg = load_run(a.run, a.which)
        _, test, info = load_data(cfg)
        x, y = test.x[: a.batch].float(), test.y[: a.batch].long()
        norm = a.norm or cfg.norm
        threat = ThreatMaker(norm, info.name, info, cfg.k, cfg.seed, cfg.segment_dirs)(x, a.eps)
    except CertlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.run} ({a.which}.pt), {x.shape[0]} test images, {norm} eps {a.eps}, threads {a.threads}, "
          f"memory settings: {MEMORY}")
    with torch.no_grad():
        t_fwd, _ = _timed(lambda: model(x), max(a.reps, 5))
        print(f"forward: {t_fwd * 1e3:.2f} ms per batch")
        print("| method | ms per batch | × forward | certified |")
        print("|---|---|---|---|")
        for m in a.methods.split(","):
            t, ok = _timed(lambda: certlab.certify(model, x, y, threat, method=m), a.reps)
            print(f"| {m} | {t * 1e3:.1f} | {t / t_fwd:.1f} | {int(ok.sum())} / {x.shape[0]} |")
        g = build_graph(model, x)
        plain = interval_pass(g, x, threat)[0]
        ref = {}
        pre = backsub.intermediate(g, x, threat, reference=ref)
    print("\nunstable ReLUs per image (mean / max over the batch), CROWN intermediate bounds")
    print("| ReLU node | neurons | plain IBP | IBP from refined earlier layers | after refinement |")
    print("|---|---|---|---|---|")
    for r in g.relus:
        print(f"| {r} | {plain[r][0][0].numel()} | {_unstable(plain[r])} | {_unstable(ref[r])} | {_unstable(pre[r])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
