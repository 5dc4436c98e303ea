"""How far certlab's CROWN-IBP is from the least work any CROWN-IBP must do, next to auto_LiRPA's CROWN-IBP, all
measured in one run.

The issue's target is CROWN-IBP throughput ≥ 3× auto_LiRPA's on the small CNN, i.e. a certlab call in at most a
third of auto_LiRPA's time. This script times, call by call in rounds (so a drift in the machine's speed hits every
row alike), for the margin specification (S = K − 1 rows per sample, lower and upper bounds: 2S rows):

- ``certlab``: ``certlab.bounds(model, x, LinfBall(eps), "crown-ibp", C)``;
- ``auto_LiRPA``: ``compute_bounds(method="CROWN-IBP")`` in its patches and matrix modes, when importable;
- the **floor**: only the work no CROWN-IBP can skip:
  - the multiply-adds of every product, timed at the machine's peak GEMM rate (a 1024³ GEMM measured in the same
    run): the interval pass's two products per layer (centre and radius), and the 2S rows per sample back through
    every layer but the last, into which the specification is folded (a Linear's in·out multiply-adds per row, a
    convolution's out-positions·C_out·C_in·k² — exactly the forward's count, so no zeros, no padding and no
    accumulation are paid for);
  - one read-and-write pass over the rows at each ReLU (the relaxation needs at least that, and a dot product for
    its constant, which is left out), timed on tensors of the real shape;
  - the concretisation over the input box (Λ·centre and |Λ|·radius), timed likewise.

The floor is optimistic: it leaves out every elementwise pass after the first, the ReLU lines, the specification and
the input box, and assumes every product runs at the rate of a large square GEMM. When it alone exceeds a third of
auto_LiRPA's time, the 3× target is out of reach of this machine's single-core arithmetic, by any implementation.

    python benchmarks/crown_ibp_floor.py --batch 64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from certlab import runtime

runtime.tune_for_script()

import torch  # noqa: E402

import certlab  # noqa: E402
from certlab.tensorops import bdot  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bounds import MODELS, case, import_lirpa, lirpa_call, machine_args, parse, synced  # noqa: E402
from ibp_floor import layers_of, variants  # noqa: E402


def macs_of(model, x):
    """[(layer index, layer, multiply-adds of one sample's forward through it)] for the Linear and Conv2d layers."""
    out, z = [], x[:1]
    with torch.no_grad():
        for i, m in enumerate(layers_of(model)):
            y = m(z)
            if isinstance(m, torch.nn.Linear):
                out.append((i, m, m.in_features * m.out_features))
            elif isinstance(m, torch.nn.Conv2d):
                out.append((i, m, y[0].numel() * m.weight[0].numel()))
            z = y
    return out


def peak_gemm(device, n=1024, reps=5):
    """The best multiply-add rate of one n×n×n GEMM on this device (MAC/s)."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = torch.randn(n, n, generator=g, device=device), torch.randn(n, n, generator=g, device=device)
    mm = synced(lambda: a @ b, device)
    mm()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t)
    return n ** 3 / best


def floor_products(model, x, rows):
    """{row name: multiply-adds} of the products every CROWN-IBP call needs: the interval pass's two per layer and the
    2S rows back through every layer but the last (into which the specification is folded)."""
    B = x.shape[0]
    layers = macs_of(model, x)
    out = {"interval pass (centre and radius, every layer)": 2 * B * sum(m for _, _, m in layers)}
    for i, m, macs in layers[:-1]:
        kind = "linear" if isinstance(m, torch.nn.Linear) else "conv"
        out[f"rows back through {kind} {i}"] = B * rows * macs
    return out


def floor_passes(model, x, rows):
    """{row name: fn}: one read-and-write pass over the rows at each ReLU, and the concretisation over the box."""
    B = x.shape[0]
    g = torch.Generator(device=x.device).manual_seed(0)
    rnd = (lambda *s: torch.randn(*s, generator=g, device=x.device))
    ops, z = {}, x[:1]
    with torch.no_grad():
        for i, m in enumerate(layers_of(model)):
            if isinstance(m, torch.nn.ReLU):
                A = rnd(B, rows, z[0].numel())
                ops[f"one pass over the rows at ReLU {i} ({z[0].numel()} neurons)"] = (lambda A=A: A.clamp(max=0))
            z = m(z)
    n = x[0].numel()
    A, mid, rad = rnd(B, rows, n), rnd(B, n), rnd(B, n).abs()
    ops[f"concretisation over the box ({n} inputs)"] = (lambda: bdot(A, mid) - bdot(A.abs(), rad))
    return ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-cnn", choices=[k for k in MODELS if k != "cnn7"])
    machine_args(ap)
    ap.add_argument("--rounds", type=int, default=30, help="rounds of one call of every row")
    ap.add_argument("--no-lirpa", action="store_true", help="skip auto_LiRPA even if importable")
    args = parse(ap)
    if args.batch < 1 or args.rounds < 1 or not args.eps > 0:
        raise SystemExit("--batch and --rounds must be at least 1 and --eps positive")
    model, x, _, C = case(args.model, args.batch, args.device)
    threat = certlab.LinfBall(args.eps)
    S = C.shape[1]

    calls = {"certlab": synced(lambda: certlab.bounds(model, x, threat, method="crown-ibp", C=C), args.device)}
    lirpa = None if args.no_lirpa else import_lirpa()
    if lirpa is None and not args.no_lirpa:
        print("auto_LiRPA not importable: certlab and the floor only")
    for mode in ("patches", "matrix") if lirpa is not None else ():
        calls[f"auto_LiRPA ({mode})"] = lirpa_call(lirpa, model, x, C, args.eps, mode, "CROWN-IBP")
    products = floor_products(model, x, 2 * S)
    passes = floor_passes(model, x, 2 * S)
    fns = {**calls, **{k: synced(f, args.device) for k, f in passes.items()}}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            f()
        for _ in range(args.rounds):
            for k, f in fns.items():
                a = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - a)
    rate = peak_gemm(args.device)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med.update({k: macs / rate * 1e3 for k, macs in products.items()})
    floor = [*products, *passes]
    total = sum(med[k] for k in floor)
    print(f"\n## {args.model}, batch {args.batch}, {2 * S} rows per sample, eps {args.eps}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds; peak GEMM rate {rate / 1e9:.1f} GMAC/s "
          f"(1024³, best of 5)")
    print("| row | ms per call (median) |\n|---|---|")
    for k in calls:
        print(f"| {k} | {med[k]:.2f} |")
    for k, macs in products.items():
        print(f"| floor: {k}: {macs / 1e6:.0f} M multiply-adds at the peak GEMM rate | {med[k]:.2f} |")
    for k in passes:
        print(f"| floor: {k} | {med[k]:.2f} |")
    print(f"| **floor: sum** | **{total:.2f}** |")
    lirpa = [med[k] for k in calls if k.startswith("auto_LiRPA")]
    print(f"\ncertlab / floor: {med['certlab'] / total:.2f}×")
    if lirpa:
        best = min(lirpa)
        print(f"auto_LiRPA's faster mode: {best:.2f} ms; certlab throughput {best / med['certlab']:.2f}× it; "
              f"3× needs ≤ {best / 3:.2f} ms per call, the floor alone is {total:.2f} ms "
              f"({'below' if total <= best / 3 else 'above'} it: at most {best / total:.2f}× is reachable)")


if __name__ == "__main__":
    main()
