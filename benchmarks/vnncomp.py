"""Run a benchmark in VNN-COMP's layout (BENCHMARK_DIR/instances.csv or *_instances.csv: onnx,vnnlib,timeout per
line, paths relative to it) with ``certlab verify`` and print decided counts and times per network, next to published results when given.

    python benchmarks/vnncomp.py BENCHMARK_DIR [--published RESULTS.csv] [--timeout 60] [--limit N] [--match TEXT]
        [--threads 1] [--out FILE]

The results CSV (default: results_<benchmark>.csv in the working directory) is resumed: instances already in it are
not run again. ``--published`` reads a VNN-COMP results CSV (any row naming an .onnx, a .vnnlib and a result among
holds/unsat/violated/sat/timeout/unknown, the run time its last number); instances are matched by file names.
An answer that contradicts a published decided one (unsat vs sat) is listed.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from certlab.verify.vnncomp import read_instances, run_batch  # noqa: E402

NORMAL = {"holds": "unsat", "unsat": "unsat", "violated": "sat", "sat": "sat", "timeout": "timeout",
          "unknown": "unknown", "error": "error"}


def _key(onnx, vnnlib):
    strip = lambda p: os.path.basename(p.strip()).removesuffix(".gz")  # noqa: E731
    return strip(onnx), strip(vnnlib)


def read_published(path):
    """{(onnx name, vnnlib name): (result, seconds)} from a VNN-COMP results CSV."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            onnx = next((c for c in row if c.strip().endswith(".onnx")), None)
            spec = next((c for c in row if c.strip().endswith((".vnnlib", ".vnnlib.gz"))), None)
            res = next((NORMAL[c.strip().lower()] for c in row if c.strip().lower() in NORMAL), None)
            nums = []
            for c in row:
                try:
                    nums.append(float(c))
                except ValueError:
                    pass
            if onnx and spec and res:
                out[_key(onnx, spec)] = (res, nums[-1] if nums else float("nan"))
    return out


def table(rows, published=None, within=None):
    """Lines: per network and in total, decided (unsat + sat) and median time of the decided, ours vs published;
    ``within`` (seconds): also the published decided in at most that time (ours ran with that timeout)."""
    groups = {}
    for onnx, spec, res, t in rows:
        groups.setdefault(os.path.basename(onnx), []).append((_key(onnx, spec), res, float(t)))
    head = f"{'network':32} {'n':>4} {'unsat':>6} {'sat':>5} {'decided':>8} {'median s':>9}"
    if published is not None:
        head += (f" | {'pub unsat':>9} {'pub sat':>8} {'pub decided':>11} {'pub median s':>12} {'only ours':>9} "
                 f"{'only pub':>8}")
        if within is not None:
            head += f" {'pub <= ' + format(within, 'g') + ' s':>12}"
    lines, bad = [head], []
    every = []
    for name, items in sorted(groups.items()) + [("total", None)]:
        items = items if items is not None else every
        if name != "total":
            every.extend(items)
        dec = [t for _, r, t in items if r in ("unsat", "sat")]
        line = (f"{name:32} {len(items):4d} {sum(r == 'unsat' for _, r, _ in items):6d} "
                f"{sum(r == 'sat' for _, r, _ in items):5d} {len(dec):8d} "
                f"{statistics.median(dec) if dec else float('nan'):9.2f}")
        if published is not None:
            pub = [published.get(k, ("missing", float("nan"))) for k, _, _ in items]
            pdec = [t for r, t in pub if r in ("unsat", "sat")]
            ours_only = sum(r in ("unsat", "sat") and p[0] not in ("unsat", "sat") for (_, r, _), p in zip(items, pub))
            pub_only = sum(r not in ("unsat", "sat") and p[0] in ("unsat", "sat") for (_, r, _), p in zip(items, pub))
            line += (f" | {sum(r == 'unsat' for r, _ in pub):9d} {sum(r == 'sat' for r, _ in pub):8d} {len(pdec):11d} "
                     f"{statistics.median(pdec) if pdec else float('nan'):12.2f} {ours_only:9d} {pub_only:8d}")
            if within is not None:
                line += f" {sum(t <= within for t in pdec):12d}"
            if name != "total":
                bad += [k for (k, r, _), p in zip(items, pub) if {r, p[0]} == {"unsat", "sat"}]
        lines.append(line)
    if published is not None:
        lines.append(f"contradictions with the published results: {len(bad)}" + "".join(f"\n  {a} {b}" for a, b in bad))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark", help="folder with instances.csv (VNN-COMP layout)")
    ap.add_argument("--published", default=None, help="a VNN-COMP results CSV to compare with")
    ap.add_argument("--timeout", type=float, default=None, help="cap on each instance's timeout (seconds)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N instances (after --match)")
    ap.add_argument("--match", default=None, help="only instances whose onnx or vnnlib path contains this text")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--out", default=None, help="results CSV (resumed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per instance")
    args = ap.parse_args(argv)
    found = [f for f in sorted(os.listdir(args.benchmark)) if f == "instances.csv" or f.endswith("_instances.csv")]
    if not found:
        sys.exit(f"error: no instances.csv (or *_instances.csv) in {args.benchmark}")
    csv_path = os.path.join(args.benchmark, found[0])
    name = os.path.basename(os.path.normpath(args.benchmark))
    out = args.out or f"results_{name}.csv"
    if args.limit is not None or args.match:  # a CSV of the chosen instances next to the results (absolute paths)
        inst = [i for i in read_instances(csv_path) if not args.match or args.match in i[0] + i[1]][:args.limit]
        csv_path = out + ".instances.csv"
        with open(csv_path, "w") as f:
            f.writelines(f"{a},{b},{t}\n" for a, b, t in inst)
    rows = run_batch(csv_path, out, args.method, args.timeout, log=lambda m: print(m, file=sys.stderr, flush=True),
                     threads=args.threads)
    pub = read_published(args.published) if args.published else None
    print(f"benchmark {name}: {len(rows)} instances, method {args.method}, results in {out}")
    print("\n".join(table([(r[0], r[1], r[2], r[3]) for r in rows], pub, args.timeout)))


if __name__ == "__main__":
    main()
