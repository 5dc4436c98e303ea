"""``certlab certify``, ``certlab diagnose`` and ``certlab export`` (run directories written by ``certlab train``)."""

from __future__ import annotations

import argparse
import json
import os

from certlab.errors import CertlabError
from certlab.fileio import write_text

DIAGNOSE_COLUMNS = """\
columns (one row per relaxation; means over the --n samples; docs/verification.md has the details):
  width        mean width upper - lower of the bounds on the logits (smaller: tighter)
  LP gap       mean (LP optimum - relaxation's bound) of the margins f_y - f_j on --lp-samples samples, the LP
               being the triangle relaxation with CROWN intermediate bounds (0: as tight as that LP; - : skipped)
  certified    share of samples whose every margin lower bound is > 0
  unstable     mean count per sample of ReLUs whose input bounds (by this relaxation) cross zero, l < 0 < u
  1/gap        certlab's tightness measure (higher: tighter): 1 / mean over samples and j != y of the clean margin
               f_y(x) - f_j(x) minus its lower bound over the set. Not the paper's tightness scalar (Jovanovic et
               al. 2022 publish no procedure for theirs): compare orderings, not values
  continuous   Jovanovic et al.'s continuity: is the relaxation's ReLU transformer a continuous function of the
               pre-activation bounds (l, u)? yes when relu jump < 1e-6 (paper: IBP, DeepZ yes; hBox, CROWN,
               CROWN-IBP no). A property of the relaxation, the same for every model
  relu jump    the measurement behind it: largest jump of the bounds of a probe network (one ReLU, inputs whose
               box gives z in [l, u]) as (l, u) sweeps two lines, isolated by bisection (0: continuous)
  loss jump    the same on this model: largest jump of the certified loss CE(-margins) of the first --loss-n
               samples along a random weight direction (norm --radius x |weights|, --grid points, then 16
               bisections of the 2 largest changes). Below ~1e-5: no jump found (what is left is the loss's slope
               over the last bracket); larger: a transformer switched cases inside it (- : --grid 0)
  sensitive    Jovanovic et al.'s sensitivity: does the bound depend on (l, u), hence on the earlier weights,
               through bound-dependent slopes such as u/(u - l) (a rational function: yes) or only piecewise
               linearly (no)? yes when relu curv > 1e-3 (paper: IBP, hBox no; DeepZ, CROWN, CROWN-IBP yes)
  relu curv    the measurement behind it: median over the probe's crossing points of |second derivative| /
               (1 + |slope|) of its bounds along the sweeps (certlab's measurement; the paper's is analytic)"""

WHICH_HELP = ("checkpoint: last (default) or best (selected on validation samples: the first val_n test samples "
              "unless the run held out val_split training samples)")


def register(subparsers) -> None:
    p = subparsers.add_parser("certify", help="verify test samples of a trained run (verified/falsified/unknown)",
                              description="Verify the first --n test samples of a run with one method and append "
                                          "one JSON line per sample to the results file; a rerun skips the samples "
                                          "already there.")
    p.add_argument("run_dir", help="run directory written by certlab train")
    p.add_argument("--norm", choices=("linf", "l2", "segments"), default=None, help="default: the run's norm")
    p.add_argument("--eps", type=float, default=None, help="radius (default: the run's evaluation eps)")
    p.add_argument("--method", default="crown",
                   help="complete: bab | milp | lp (the triangle LP: sound, incomplete); relaxations: ibp | hbox | "
                        "deepz | fastlin | crown | crown-ibp | alpha-crown | box-c:OMEGA | box-dc:OMEGA:F "
                        "(loose Box, docs/verification.md) (default: crown)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per sample (bab, milp, lp)")
    p.add_argument("--n", type=int, default=None, help="first N test samples (default: all)")
    p.add_argument("--out", default=None, help="JSON-lines output (default: RUN_DIR/certify_<method>_<norm>_<eps>[_float64][_best].jsonl)")
    p.add_argument("--which", choices=("best", "last"), default="last", help=WHICH_HELP)
    p.add_argument("--batch", type=int, default=256, help="samples per batch for the relaxations")
    p.add_argument("--max-nodes", type=int, default=100000, help="bab: subdomains per sample")
    p.add_argument("--float64", action="store_true",
                   help="compute in float64 (model and data): certificates with float32 rounding to spare")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where bab and the relaxations run (milp and lp always solve on the CPU)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (by default a bar on a terminal, else a log line every 10 s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster on a busy machine)")
    p.set_defaults(func=certify_cmd)

    d = subparsers.add_parser("diagnose", help="tightness, continuity and sensitivity of relaxations (Jovanovic et al.)",
                              description="Compare relaxations on a trained run's model: one row per relaxation, "
                                          "measured on the first --n test samples.",
                              epilog=DIAGNOSE_COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("run_dir", help="run directory written by certlab train")
    d.add_argument("--relaxations", default="ibp,hbox,crown,deepz,crown-ibp",
                   help="comma-separated relaxations to compare (default: ibp,hbox,crown,deepz,crown-ibp)")
    d.add_argument("--norm", choices=("linf", "l2", "segments"), default=None,
                   help="threat set (default: the run's norm)")
    d.add_argument("--eps", type=float, default=None, help="radius (default: the run's evaluation eps)")
    d.add_argument("--n", type=int, default=64, help="test samples (default 64)")
    d.add_argument("--lp-samples", type=int, default=4,
                   help="samples for the gap to the LP optimum (default 4; 0: skip, the slowest part)")
    d.add_argument("--grid", type=int, default=11,
                   help="points of the loss-jump scan along a weight direction (default 11; 0: skip it)")
    d.add_argument("--loss-n", type=int, default=16, help="samples of the loss-jump scan (default 16)")
    d.add_argument("--radius", type=float, default=0.05,
                   help="length of that direction relative to the norm of the weights (default 0.05)")
    d.add_argument("--seed", type=int, default=0, help="seed of that direction (default 0)")
    d.add_argument("--which", choices=("best", "last"), default="last", help=WHICH_HELP)
    d.add_argument("--json", default=None, help="also write the rows to this JSON file")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the bounds run (default cpu)")
    d.add_argument("--no-progress", action="store_true",
                   help="no progress output (by default a line with the elapsed time every 10 s on stderr)")
    d.set_defaults(func=diagnose_cmd)

    e = subparsers.add_parser("export", help="write the run's model as ONNX and a sample's property as VNN-LIB")
    e.add_argument("run_dir", help="run directory written by certlab train")
    e.add_argument("--onnx", default=None, help="output .onnx file")
    e.add_argument("--vnnlib", default=None, help="output .vnnlib file (needs --eps)")
    e.add_argument("--index", type=int, default=0, help="test sample for the VNN-LIB property")
    e.add_argument("--eps", type=float, default=None, help="l_inf radius of the property (default: the run's)")
    e.add_argument("--which", choices=("best", "last"), default="last", help=WHICH_HELP)
    e.set_defaults(func=export_cmd)


# -- helpers ---------------------------------------------------------------------------------------------------
def load(run_dir, which="last"):
    """(model, cfg, test set, ThreatMaker) of a run."""
    from certlab.train import load_run
    from certlab.train.setup import load_data
    from certlab.train.threats import ThreatMaker

    model, cfg = load_run(run_dir, which)
    _, test, info = load_data(cfg)
    return model, cfg, test, lambda norm: ThreatMaker(norm, info.name, info, cfg.k, cfg.seed, cfg.segment_dirs)


# what a result line written before the key existed means (the checkpoint: the default of the time; the
# checkpoint's digest: unknown, so not compared)
SETTING_DEFAULTS = {"dtype": "float32", "checkpoint": "best"}
UNRECORDED = {"checkpoint_sha256"}


def checkpoint_digest(run_dir, which) -> str:
    """First 16 hex digits of the SHA-256 of the run's checkpoint file: result lines of a model that was trained
    further (or replaced) since are never mixed with the new model's."""
    import hashlib

    h = hashlib.sha256()
    with open(os.path.join(run_dir, f"{which}.pt"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_results(path: str, setting: dict) -> dict:
    """{index: record} already in ``path`` for the same setting; another setting → CertlabError."""
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                idx = int(rec["index"])
            except (ValueError, KeyError, TypeError):
                raise CertlabError(f"{path}:{no} is not a certify result line; remove the file or pass --out") from None
            other = {k: rec.get(k, SETTING_DEFAULTS.get(k)) for k in setting if k in rec or k not in UNRECORDED}
            if other != {k: setting[k] for k in other}:
                if {k for k in other if other[k] != setting[k]} == {"checkpoint_sha256"}:
                    raise CertlabError(f"{path} holds results for an earlier version of {setting['checkpoint']}.pt "
                                       "(the run changed since); remove the file or pass another --out")
                raise CertlabError(f"{path} holds results for {other}, not {setting}; pass another --out")
            out[idx] = rec
    return out


def set_threads(n) -> None:
    if n is None or n == 0:
        return
    if n < 0:
        raise CertlabError(f"--threads must be >= 0, got {n}")
    import torch

    torch.set_num_threads(int(n))


def _progress(total, desc, enabled):
    from certlab.progress import bar

    return bar(total, desc, enabled, unit="samples", leave=True)  # tqdm on a terminal, periodic log lines elsewhere


# -- certify -----------------------------------------------------------------------------------------------------
def certify_cmd(args) -> int:
    import torch

    from certlab.train.setup import resolve_device
    from certlab.verify.complete import ALL_METHODS, COMPLETE, verify_any

    method = args.method.lower()
    if method not in COMPLETE:
        from certlab.bounds.api import resolve_method

        from certlab.bounds.loosebox import is_loosebox

        if is_loosebox(method):  # box-c:OMEGA / box-dc:OMEGA:F; bad parameters: its one-line error
            method = resolve_method(method)
        else:
            try:
                method = resolve_method(method)
            except CertlabError:
                method = None
    if method not in ALL_METHODS and not (method and method.startswith("box-")):
        import difflib

        near = difflib.get_close_matches(args.method.lower(), ALL_METHODS, n=2)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise CertlabError(f"unknown method {args.method!r}{hint}; choose one of {', '.join(ALL_METHODS)}")
    for name in ("timeout", "batch", "max_nodes"):
        if not getattr(args, name) > 0:
            raise CertlabError(f"--{name.replace('_', '-')} must be > 0")
    if args.n is not None and args.n < 1:
        raise CertlabError(f"--n must be a positive integer, got {args.n}")
    set_threads(args.threads)
    model, cfg, test, maker_for = load(args.run_dir, args.which)
    norm = args.norm or cfg.norm
    eps = cfg.final_eval_eps if args.eps is None else args.eps
    if not eps >= 0:
        raise CertlabError(f"--eps must be >= 0, got {eps}")
    maker = maker_for(norm)
    dname = "float64" if args.float64 else "float32"
    dtype = getattr(torch, dname)
    device = torch.device("cpu") if method in ("milp", "lp") else resolve_device(args.device)
    model = model.to(device=device, dtype=dtype)
    n = len(test) if args.n is None else min(args.n, len(test))
    suffix = ("_float64" if args.float64 else "") + ("_best" if args.which == "best" else "")
    out = args.out or os.path.join(args.run_dir, f"certify_{method}_{norm}_{eps:g}{suffix}.jsonl")
    setting = {"method": method, "norm": norm, "eps": eps, "dtype": dname, "checkpoint": args.which,
               "checkpoint_sha256": checkpoint_digest(args.run_dir, args.which)}
    done = read_results(out, setting)
    todo = [i for i in range(n) if i not in done]
    chunk = {"milp": 1, "lp": 1, "bab": min(args.batch, 32)}.get(method, args.batch)
    kw = {"max_nodes": args.max_nodes} if method == "bab" else {}
    bar = _progress(len(todo), f"certify {method}", not args.no_progress)
    try:
        for s in range(0, len(todo), chunk):
            idx = torch.tensor(todo[s:s + chunk])
            x, y = test.x[idx].to(device=device, dtype=dtype), test.y[idx].to(device)
            res = verify_any(model, x, y, maker(x, eps), method, timeout=args.timeout, **kw)
            for i, r in zip(idx.tolist(), res):
                done[i] = {"index": i, "label": int(test.y[i]), **setting, **r.to_dict()}
            write_text(out, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
            bar.update(len(idx))
    finally:
        bar.close()
    counts = {"verified": 0, "falsified": 0, "unknown": 0}
    for i in range(n):
        counts[done[i]["status"]] += 1
    total = max(n, 1)
    print(f"certify {method} {norm} eps={eps:g} ({setting['dtype']}) on {n} test samples of {args.run_dir} "
          f"({args.which}.pt)")
    for k, v in counts.items():
        print(f"  {k:9s} {v:6d}  ({100.0 * v / total:.1f}%)")
    print(f"results: {out}")
    return 0


# -- diagnose -------------------------------------------------------------------------------------------------
def diagnose_cmd(args) -> int:
    from certlab.train.setup import resolve_device
    from certlab.verify.diagnostics import diagnose, format_rows

    set_threads(args.threads)
    device = resolve_device(args.device)
    model, cfg, test, maker_for = load(args.run_dir, args.which)
    model = model.to(device)
    test = (test.x[:args.n].to(device), test.y[:args.n].to(device))
    norm = args.norm or cfg.norm
    eps = cfg.final_eval_eps if args.eps is None else args.eps
    maker = maker_for(norm)
    rel = [r.strip() for r in args.relaxations.split(",") if r.strip()]
    from certlab.progress import heartbeat

    with heartbeat(f"diagnose {','.join(rel)}", not args.no_progress):
        rows = diagnose(model, test, lambda x: maker(x, eps), rel, n=args.n, lp_samples=args.lp_samples,
                        grid=args.grid, radius=args.radius, seed=args.seed, loss_n=args.loss_n)
    print(format_rows(rows, f"relaxation diagnostics: {norm} eps={eps:g}, {args.n} samples of {args.run_dir} "
                            "(columns: certlab diagnose --help)"))
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2))
    return 0


# -- export -------------------------------------------------------------------------------------------------------
def export_cmd(args) -> int:
    if not args.onnx and not args.vnnlib:
        raise CertlabError("nothing to export: give --onnx FILE and/or --vnnlib FILE")
    model, cfg, test, _ = load(args.run_dir, args.which)
    if args.onnx:
        from certlab.interchange.onnx import export_onnx

        export_onnx(model, tuple(test.x.shape[1:]), args.onnx)
        print(f"wrote {args.onnx}")
    if args.vnnlib:
        from certlab.interchange.vnnlib import write_vnnlib

        if not 0 <= args.index < len(test):
            raise CertlabError(f"--index must lie in [0, {len(test) - 1}], got {args.index}")
        eps = cfg.final_eval_eps if args.eps is None else args.eps
        x, y = test.x[args.index], int(test.y[args.index])
        info = test.info
        domain = None if info.domain is None else tuple(info.domain)
        with __import__("torch").no_grad():
            K = int(model(x.unsqueeze(0)).shape[1])
        write_vnnlib(args.vnnlib, x, y, eps, K, domain=domain)
        print(f"wrote {args.vnnlib} (sample {args.index}, label {y}, l_inf eps={eps:g})")
    return 0
