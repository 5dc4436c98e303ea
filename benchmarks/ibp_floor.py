"""How far certlab's IBP is from what eager PyTorch can do at all: the cost of a plain forward pass, measured in the
same run, for

- ``certlab``: ``certlab.bounds(model, x, LinfBall(eps), "ibp", C)`` (validation, graph, folded margin spec);
- ``eager``: the same interval arithmetic hand-written for this model (box, c' = Wc + b and r' = |W|r per layer,
  interval ReLUs, the margin rows folded into the last layer as V = C·W_L) with no checks at all;
- ``stacked``: as eager, but centre and radius in one tensor and each layer's two products in one batched call
  (baddbmm / grouped convolution), with [W; |W|] prepared once outside the timed call — a cache certlab does not
  keep, because a parameter changed through ``.data`` keeps its version counter and a stale |W| would be unsound;
- ``products``: only the two products per layer (both with W), no elementwise work;
- ``compiled`` (with ``--compile``): ``torch.compile`` of ``eager``, so inductor fuses the elementwise passes (box,
  interval ReLUs, specification) around the library's GEMM/convolution calls; the compile time is printed. This is
  the floor with fused elementwise kernels; the forward pass it is compared with stays eager, as a user runs it.

Each ratio is the median over calls alternated with a forward pass. The issue's target is IBP ≤ 2.2× a forward.

    python benchmarks/ibp_floor.py --models mlp,small-cnn --batch 64 --threads 1
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
import torch.nn.functional as F  # noqa: E402

import certlab  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bounds import MODELS, case, machine_args, parse, synced  # noqa: E402


def layers_of(model):
    out = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Flatten))]
    if any(not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Flatten, torch.nn.Sequential))
           for m in model.modules()):
        raise SystemExit("ibp_floor handles Sequential models of Linear/Conv2d/ReLU/Flatten only")
    return out


def variants(model, x, C, eps, compile_=False):
    layers = layers_of(model)
    *layers, last = layers  # the last Linear gets the margin rows folded in, as certlab does: V = C·W_L
    if not isinstance(last, torch.nn.Linear):
        raise SystemExit("ibp_floor needs a model that ends in a Linear layer")
    B = x.shape[0]

    def spec(c, r):  # lower bound of C·(W_L z + b_L) over the box [c − r, c + r]
        V = torch.matmul(C, last.weight)  # [B, S, n]
        return torch.einsum("bsn,bn->bs", V, c) + C @ last.bias - torch.einsum("bsn,bn->bs", V.abs(), r)

    def eager():
        lo, hi = (x - eps).clamp_(0, 1), (x + eps).clamp_(0, 1)
        c = torch.lerp(lo, hi, 0.5)
        r = hi - c
        for m in layers:
            if isinstance(m, torch.nn.Linear):
                c, r = F.linear(c, m.weight, m.bias), F.linear(r, m.weight.abs())
            elif isinstance(m, torch.nn.Conv2d):
                c, r = m(c), F.conv2d(r, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups)
            elif isinstance(m, torch.nn.Flatten):
                c, r = c.flatten(1), r.flatten(1)
            else:
                lo, hi = (c - r).relu_(), (c + r).relu_()
                c = lo.lerp_(hi, 0.5)
                r = hi.sub_(c)
        return spec(c, r)

    M = torch.tensor([[0.5, 0.5], [-0.5, 0.5]], device=x.device, dtype=x.dtype)
    sign = torch.tensor([-1.0, 1.0], device=x.device, dtype=x.dtype)
    prepared = {}
    for m in layers:
        if isinstance(m, torch.nn.Linear):
            b = m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
            prepared[m] = (torch.stack([m.weight.t(), m.weight.abs().t()]).contiguous(),
                           torch.stack([b, torch.zeros_like(b)]).unsqueeze(1))
        elif isinstance(m, torch.nn.Conv2d):
            b = m.bias if m.bias is not None else m.weight.new_zeros(m.out_channels)
            prepared[m] = (torch.cat([m.weight, m.weight.abs()]), torch.cat([b, torch.zeros_like(b)]))

    def stacked():
        xf = x.reshape(B, -1)
        lu = torch.empty(B, 2, xf.shape[1], device=x.device, dtype=x.dtype)
        torch.sub(xf, eps, out=lu[:, 0])
        torch.add(xf, eps, out=lu[:, 1])
        cr = torch.matmul(M, lu.clamp_(0, 1))  # [B, 2, n]: centre and radius, per sample
        cr, first = cr.view(B, 2 * x.shape[1], *x.shape[2:]), True  # channels: the c's, then the r's
        for m in layers:
            if isinstance(m, torch.nn.Linear):
                if cr.dim() != 3 or cr.shape[0] != 2:  # to [2, B, n]: one batched product for both
                    cr = cr.reshape(B, 2, -1).transpose(0, 1)
                W2, b2 = prepared[m]
                cr = torch.baddbmm(b2, cr, W2)
            elif isinstance(m, torch.nn.Conv2d):
                W2, b2 = prepared[m]
                cr = F.conv2d(cr, W2, b2, m.stride, m.padding, m.dilation, 2 * m.groups)
            elif isinstance(m, torch.nn.ReLU):
                if cr.shape[0] == 2 and cr.dim() == 3:
                    lu = torch.addcmul(cr[0], sign.view(2, 1, 1), cr[1]).relu_()
                    cr = torch.matmul(M, lu.view(2, -1)).view(lu.shape)
                else:
                    shape = cr.shape
                    v = cr.view(B, 2, -1)
                    lu = torch.addcmul(v[:, :1], sign.view(1, 2, 1), v[:, 1:]).relu_()
                    cr = torch.matmul(M, lu).view(shape)
        if cr.dim() != 3 or cr.shape[0] != 2:
            cr = cr.reshape(B, 2, -1).transpose(0, 1)
        return spec(cr[0], cr[1])

    def products():
        c = r = x
        for m in layers:
            if isinstance(m, torch.nn.Linear):
                c, r = F.linear(c, m.weight, m.bias), F.linear(r, m.weight)
            elif isinstance(m, torch.nn.Conv2d):
                c, r = m(c), m(r)
            elif isinstance(m, torch.nn.Flatten):
                c, r = c.flatten(1), r.flatten(1)
        return F.linear(c, last.weight, last.bias), F.linear(r, last.weight)

    threat = certlab.LinfBall(eps)
    ours = lambda: certlab.bounds(model, x, threat, method="ibp", C=C).lower  # noqa: E731
    out = {"certlab": ours, "eager": eager, "stacked": stacked, "products": products}
    if compile_:
        compiled = torch.compile(eager, dynamic=False)
        t = time.perf_counter()
        try:
            with torch.no_grad():
                compiled()
        except Exception as e:  # no C++ toolchain, or inductor cannot lower an op: report it, time the rest
            print(f"torch.compile of the eager variant failed, no compiled row: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}")
        else:
            print(f"torch.compile of the eager variant: {time.perf_counter() - t:.1f} s for the first call")
            out["compiled"] = compiled
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,small-cnn")
    machine_args(ap)
    ap.add_argument("--calls", type=int, default=200, help="alternated calls per variant")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the eager variant")
    args = parse(ap)
    for name in args.models.split(","):
        if name not in MODELS or name == "cnn7":
            raise SystemExit(f"--models: choose from mlp, small-cnn (got {name!r})")
        model, x, _, C = case(name, args.batch, args.device)
        fns = {k: synced(f, args.device) for k, f in variants(model, x, C, args.eps, args.compile).items()}
        fwd = synced(lambda: model(x), args.device)
        ratios = {k: [] for k in fns}
        with torch.no_grad():
            ref = fns["eager"]()
            diff = max((fns[k]() - ref).abs().max().item() for k in fns if k not in ("eager", "products"))
            for _ in range(3):
                for f in fns.values():
                    f()
                fwd()
            for _ in range(args.calls):
                for k, f in fns.items():
                    a = time.perf_counter()
                    f()
                    b = time.perf_counter()
                    fwd()
                    ratios[k].append((b - a) / (time.perf_counter() - b))
        print(f"\n## {name}, batch {args.batch}, eps {args.eps}, device {args.device}, threads {torch.get_num_threads()}"
              f" (max |difference| of the lower bounds: {diff:.1e})")
        print("| variant | × forward (median) |\n|---|---|")
        for k, v in ratios.items():
            print(f"| {k} | {statistics.median(v):.2f} |")


if __name__ == "__main__":
    main()
