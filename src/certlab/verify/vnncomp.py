"""``certlab verify``: an ONNX network against a VNN-LIB property, answered in VNN-COMP's format.

    certlab verify net.onnx prop.vnnlib --timeout 60 [--method auto] [--out result.txt]
    certlab verify --instances instances.csv --out results.csv   # batch: onnx,vnnlib,timeout per line

The answer is ``unsat`` (verified), ``sat`` (followed by the witness ``((X_0 v) … (Y_0 v) …)``), ``timeout`` or
``unknown``. Each instance runs in a child process that is stopped at its deadline, so the time limit holds within a
second whatever the solver does. A ``sat`` is run again through ONNX Runtime (where installed; else the imported
network in float32) and reported only if the property holds there too. The batch form resolves paths relative to
the CSV, appends one line per instance to the results CSV and skips the instances already there.
"""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from certlab.errors import CertlabError
from certlab.fileio import write_text

GRACE = 0.5  # seconds past the deadline before the child is killed


def input_shape(path):
    """Per-sample input shape declared by the ONNX file (its first dimension is the batch)."""
    import onnx

    m = onnx.load(path)
    init = {i.name for i in m.graph.initializer}
    inp = [i for i in m.graph.input if i.name not in init][0]
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    return tuple(dims[1:]) if len(dims) > 1 else tuple(dims)


def run_network(path, x, shape, model=None):
    """Outputs (float64 numpy, flat) of the network on x: ONNX Runtime where installed, else the imported model."""
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        full = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        out = s.run(None, {inp.name: np.asarray(x, np.float32).reshape(full)})[0]
        return np.asarray(out, np.float64).reshape(-1)
    import torch

    with torch.no_grad():
        return model.float()(torch.as_tensor(x, dtype=torch.float32).reshape(1, *shape)).double().numpy().reshape(-1)


def witness_text(x, y) -> str:
    lines = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y)]
    return "(" + "\n ".join(lines) + ")"


def _child(conn, onnx_path, spec_path, method, budget, threads=None):
    try:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from certlab.interchange.onnx import load_onnx
        from certlab.interchange.vnnlib import read_property
        from certlab.verify.decide import decide

        t0 = time.perf_counter()
        model = load_onnx(onnx_path)
        prop = read_property(spec_path)
        shape = input_shape(onnx_path)
        left = budget - (time.perf_counter() - t0)
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        a = decide(model, prop, shape, method, max(left, 0.05), log=log) if left > 0 else None
        conn.send(("ok", None if a is None else (a.status, a.x, a.y, a.note)))
    except CertlabError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported as the instance's error line
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    finally:
        conn.close()


def verify_instance(onnx_path, spec_path, timeout=60.0, method="auto", threads=None):
    """(status, witness text or "", seconds, note) for one instance; the child is killed at the deadline."""
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, onnx_path, spec_path, method, float(timeout) - 0.3, threads),
                       daemon=True)
    proc.start()
    send.close()
    msg = None
    if recv.poll(float(timeout) + GRACE):
        try:
            msg = recv.recv()
        except EOFError:
            msg = None
    if proc.is_alive():
        proc.kill()
    proc.join(1.0)
    took = time.perf_counter() - t0
    if msg is None:
        return ("timeout", "", took, "") if took >= timeout else ("unknown", "", took, "the solver process died")
    kind, val = msg
    if kind == "error":
        raise CertlabError(val)
    if val is None:
        return "timeout", "", took, ""
    status, x, y, note = val
    if status == "sat":
        from certlab.interchange.vnnlib import read_property

        prop = read_property(spec_path)
        y2 = run_network(onnx_path, x, input_shape(onnx_path))
        if not prop.violation(x, y2, tol=1e-5):
            return "unknown", "", took, "a witness did not hold when re-run on the ONNX network"
        return "sat", witness_text(x, y2), took, note
    return status, "", took, note


def read_instances(csv_path):
    """[(onnx, vnnlib, timeout)] with paths relative to the CSV's folder; one-line errors on bad rows."""
    base = os.path.dirname(os.path.abspath(csv_path))
    out = []
    with open(csv_path, newline="") as f:
        for ln, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 3:
                raise CertlabError(f"{csv_path}:{ln}: expected onnx,vnnlib,timeout, got {len(row)} field(s)")
            try:
                t = float(row[2])
            except ValueError:
                raise CertlabError(f"{csv_path}:{ln}: timeout {row[2]!r} is not a number") from None
            out.append((os.path.join(base, row[0].strip()), os.path.join(base, row[1].strip()), t))
    return out


def run_batch(csv_path, out_path, method="auto", timeout=None, log=print, threads=None):
    """Run every instance of the CSV not already in out_path; returns the rows (onnx, vnnlib, status, seconds)."""
    todo = read_instances(csv_path)
    done = {}
    if os.path.exists(out_path):
        with open(out_path, newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 4 and row[0] != "onnx":
                    done[(row[0], row[1])] = row
    rows = list(done.values())
    base = os.path.dirname(os.path.abspath(csv_path))
    for i, (net, spec, t) in enumerate(todo):
        key = (os.path.relpath(net, base), os.path.relpath(spec, base))
        if key in done:
            continue
        t = t if timeout is None else min(t, timeout)
        try:
            status, _, took, note = verify_instance(net, spec, t, method, threads)
        except CertlabError as e:
            status, took, note = "error", 0.0, str(e)
        log(f"[{i + 1}/{len(todo)}] {key[0]} {key[1]}: {status} {took:.2f}s {note}".rstrip())
        rows.append([key[0], key[1], status, f"{took:.3f}"])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([["onnx", "vnnlib", "result", "time"], *rows])
        write_text(out_path, buf.getvalue())
    return rows


def register(sub):
    p = sub.add_parser("verify", help="decide a VNN-LIB property on an ONNX network (VNN-COMP format)",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("onnx", nargs="?", help="network (.onnx)")
    p.add_argument("vnnlib", nargs="?", help="property (.vnnlib)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per instance (default 60; batch: the CSV's)")
    p.add_argument("--method", default="auto", choices=("auto", "crown", "alpha-crown", "bab", "milp"),
                   help="auto: attack, CROWN, then input splitting (few inputs) or branch and bound")
    p.add_argument("--out", default=None, help="write the answer (batch: the results CSV) here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is much faster on a busy machine)")
    p.add_argument("--instances", default=None, help="batch form: an instances CSV (onnx,vnnlib,timeout per line)")
    p.set_defaults(func=main)


def main(args):
    if args.timeout is not None and not args.timeout > 0:
        raise CertlabError(f"--timeout must be > 0, got {args.timeout}")
    if args.instances:
        if args.onnx or args.vnnlib:
            raise CertlabError("give either NET.onnx SPEC.vnnlib or --instances CSV, not both")
        if not args.out:
            raise CertlabError("--instances needs --out RESULTS.csv")
        if not os.path.exists(args.instances):
            raise CertlabError(f"instances file not found: {args.instances}")
        rows = run_batch(args.instances, args.out, args.method, args.timeout,
                         log=lambda m: print(m, file=sys.stderr, flush=True), threads=args.threads)
        counts = {}
        for r in rows:
            counts[r[2]] = counts.get(r[2], 0) + 1
        print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return 0
    if not args.onnx or not args.vnnlib:
        raise CertlabError("give NET.onnx SPEC.vnnlib (or --instances CSV)")
    for f in (args.onnx, args.vnnlib):
        if not os.path.exists(f):
            raise CertlabError(f"file not found: {f}")
    status, wit, took, note = verify_instance(args.onnx, args.vnnlib, args.timeout or 60.0, args.method, args.threads)
    text = status + ("\n" + wit if wit else "") + "\n"
    print(f"{status} in {took:.2f}s" + (f" ({note})" if note else ""), file=sys.stderr)
    if args.out:
        write_text(args.out, text)
    sys.stdout.write(text)
    return 0
