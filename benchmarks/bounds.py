"""Bound-engine throughput: samples/s of every method, and its cost relative to a plain forward pass measured in the
same run: each ratio is the median over alternating pairs of calls (the method, then a forward; auto_LiRPA, then
certlab), so a drift in the machine's speed cancels. When auto_LiRPA is importable (a scratch environment, never a
dependency) it also prints certlab / auto_LiRPA throughput ratios and the largest difference between the two
libraries' bounds.

    python benchmarks/bounds.py                       # all models, all methods that fit the CPU budget
    python benchmarks/bounds.py --models small-cnn --methods ibp,crown-ibp,crown --batch 32

Models: MLP 784-256-256-10; the small CNN conv(16,4,s2,p1)-conv(32,4,s2,p1)-fc100-fc10 on 1x28x28; CNN7-BN on
3x32x32. Weights are the zoo's defaults with certlab.models.init_ibp_ (what certified training starts from).
"""

from __future__ import annotations

import argparse
import statistics
import time

from certlab import runtime

MEMORY = runtime.tune_for_script()  # the certlab command's memory settings, before torch loads (--no-tune: defaults)

import torch  # noqa: E402

import certlab  # noqa: E402
from certlab.models import build, init_ibp_

MODELS = {
    "mlp": ("mlp", (1, 28, 28), {"hidden": (256, 256)}),
    "small-cnn": ("wong-small", (1, 28, 28), {}),
    "cnn7": ("cnn7", (3, 32, 32), {}),
}
# methods whose cost on CNN7 (65k neurons a layer) needs a GPU: skipped on CPU unless asked for explicitly
HEAVY = {"cnn7": {"hbox", "deepz", "fastlin", "crown", "alpha-crown"}}


def synced(fn, device):
    """fn followed by a wait for the device's queued kernels (CUDA launches are asynchronous: without it a call's
    time would be its launch time)."""
    if not str(device).startswith("cuda"):
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def timeit_pair(fn, base, repeat, min_time=0.5):
    """Call fn and base alternately (at least ``repeat`` pairs and ``min_time`` seconds, at most 30 s). Returns
    (median seconds per fn call, median over the pairs of fn's time / base's time): on a shared machine whose speed
    drifts, each ratio compares two calls made a moment apart."""
    fn()
    base()
    tf, tb = [], []
    t0 = time.perf_counter()
    while True:
        a = time.perf_counter()
        fn()
        b = time.perf_counter()
        base()
        c = time.perf_counter()
        tf.append(b - a)
        tb.append(c - b)
        if len(tf) >= repeat and c - t0 >= min_time or c - t0 > 30:
            return statistics.median(tf), statistics.median(f / g for f, g in zip(tf, tb))


def timeit(fn, repeat, min_time=0.5):
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if n >= repeat and el >= min_time or el > 30:
            return el / n


def margin_spec(y, K):
    eye = torch.eye(K)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    keep = torch.ones(y.shape[0], K, dtype=torch.bool)
    keep[torch.arange(y.shape[0]), y] = False
    return C[keep].reshape(y.shape[0], K - 1, K)


def machine_args(ap, batch=64):
    """The options every benchmark shares: batch, ε, torch threads and device."""
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")


def parse(ap):
    """ap's arguments, with torch's thread count set from --threads."""
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def case(name, batch, device):
    """(model, x, y, C) of every benchmark: the named zoo model with the IBP initialisation (seed 0) in eval mode,
    a uniform batch in [0, 1], random labels and their margin specification, all on ``device``."""
    arch, shape, params = MODELS[name]
    torch.manual_seed(0)
    model = build(arch, shape, 10, **params)
    init_ibp_(model)
    model = model.to(device).eval()
    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y, margin_spec(y.cpu(), 10).to(device)


def bench_model(name, methods, batch, eps, repeat, device, lirpa, explicit):
    arch, shape, _ = MODELS[name]
    model, x, y, C = case(name, batch, device)
    threat = certlab.LinfBall(eps)

    def forward():
        with torch.no_grad():
            return model(x)

    forward = synced(forward, device)
    t_fwd = timeit(forward, repeat)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    fwd_bwd = synced(fwd_bwd, device)
    t_fwd_bwd = timeit(fwd_bwd, repeat)
    print(f"\n## {name} ({arch}, input {shape}, batch {batch}, eps {eps}, device {device}, threads {torch.get_num_threads()})")
    print(f"forward: {batch / t_fwd:,.0f} samples/s; forward+backward: {batch / t_fwd_bwd:,.0f} samples/s")
    print("| method | samples/s (no grad) | × forward | samples/s (with backward) | × forward+backward |")
    print("|---|---|---|---|---|")
    rows = {}
    for m in methods:
        if m in HEAVY.get(name, ()) and not explicit and not str(device).startswith("cuda"):
            print(f"| {m} | skipped on the CPU at this size (name it in --methods to run it) | | | |")
            continue

        def run(m=m):  # bound now: rows keeps this function for the auto_LiRPA comparison
            with torch.no_grad():
                return certlab.bounds(model, x, threat, method=m, C=C)

        def run_grad():
            model.zero_grad(set_to_none=True)
            lo = certlab.bounds(model, x, threat, method=m, C=C).lower
            torch.nn.functional.softplus(-lo).mean().backward()

        run, run_grad = synced(run, device), synced(run_grad, device)

        try:
            t, r = timeit_pair(run, forward, repeat)
        except torch.cuda.OutOfMemoryError:  # e.g. hBox's dense generators on CNN7: [batch, 3072, 65536] per layer
            torch.cuda.empty_cache()
            print(f"| {m} | out of memory at batch {batch} | | | |")
            continue
        try:
            tg, rg = timeit_pair(run_grad, fwd_bwd, max(1, repeat // 2))
            grad = f"{batch / tg:,.1f} | {rg:.1f}"
        except torch.cuda.OutOfMemoryError:  # autograd keeps every layer's temporaries
            torch.cuda.empty_cache()
            grad = "out of memory | "
        rows[m] = (run, run())
        print(f"| {m} | {batch / t:,.1f} | {r:.1f} | {grad} |")
    if lirpa is not None and (name != "cnn7" or str(device).startswith("cuda")):  # CNN7 on the CPU: too slow
        compare_lirpa(lirpa, model, x, C, eps, rows, repeat, batch)


def import_lirpa():
    """(BoundedModule, BoundedTensor, PerturbationLpNorm) from auto_LiRPA, or None when it is not importable."""
    try:
        from auto_LiRPA import BoundedModule, BoundedTensor
        from auto_LiRPA.perturbations import PerturbationLpNorm
        import auto_LiRPA
    except ImportError:
        return None
    print(f"auto_LiRPA {auto_LiRPA.__version__} found: comparing")
    return BoundedModule, BoundedTensor, PerturbationLpNorm


def lirpa_call(lirpa, model, x, C, eps, mode, method):
    """A no-grad call of auto_LiRPA's ``method`` bounds of C·model over the ℓ∞ ball of radius eps ∩ [0, 1] around x,
    in conv ``mode`` ("patches" or "matrix"): returns (lower, upper)."""
    BoundedModule, BoundedTensor, PerturbationLpNorm = lirpa
    ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    bx = BoundedTensor(x, ptb)
    bm = BoundedModule(model, x, bound_opts={"conv_mode": mode}, device=str(x.device))

    def run():
        with torch.no_grad():
            return bm.compute_bounds(x=(bx,), C=C, method=method)

    return synced(run, x.device)


def compare_lirpa(lirpa, model, x, C, eps, rows, repeat, batch):
    print("\n| method | auto_LiRPA mode | auto_LiRPA samples/s | certlab / auto_LiRPA throughput | max |bound difference| |")
    print("|---|---|---|---|---|")
    for ours, theirs in (("ibp", "IBP"), ("crown-ibp", "CROWN-IBP"), ("crown", "CROWN")):
        if ours not in rows:
            continue
        for mode in ("patches", "matrix"):
            try:
                run = lirpa_call(lirpa, model, x, C, eps, mode, theirs)
                run_ours, b = rows[ours]
                t, ratio = timeit_pair(run, run_ours, repeat)  # their time / ours, call by call
                lb, ub = run()
                diff = max((lb - b.lower).abs().max().item(), (ub - b.upper).abs().max().item())
                print(f"| {ours} | {mode} | {batch / t:,.1f} | {ratio:.2f} | {diff:.2e} |")
            except Exception as e:  # a peer's failure is reported, never fatal
                print(f"| {ours} | {mode} | failed: {type(e).__name__}: {str(e)[:80]} | | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,small-cnn,cnn7")
    ap.add_argument("--methods", default=",".join(certlab.METHODS))
    machine_args(ap, batch=32)
    ap.add_argument("--cnn7-batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-lirpa", action="store_true", help="skip the auto_LiRPA comparison even if importable")
    ap.add_argument("--no-tune", action="store_true", help="keep the allocator's defaults (see certlab.runtime)")
    args = parse(ap)
    print(f"memory settings (certlab.runtime): {MEMORY}")
    lirpa = None if args.no_lirpa else import_lirpa()
    if lirpa is None and not args.no_lirpa:
        print("auto_LiRPA not importable: certlab numbers only")
    methods = [m for m in args.methods.split(",") if m]
    explicit = args.methods != ",".join(certlab.METHODS)
    for name in args.models.split(","):
        batch = args.cnn7_batch if name == "cnn7" else args.batch
        bench_model(name, methods, batch, args.eps, args.repeat, args.device, lirpa, explicit)


if __name__ == "__main__":
    main()
