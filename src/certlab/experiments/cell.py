"""What one cell does: ``run_cell(config, run_dir) -> result``.

One training run (``certlab.train.train``, which ends with the final evaluation of the run's config:
``eval_certify`` methods, ``eval_attacks``, ``eval_acr``), in
``run_dir`` (resumed from ``last.pt`` when a killed attempt left one). The result is a JSON-able dict

    {"metrics": {clean_error, robust_error, certified_error: {method: err, "train": err at the training
                 relaxation, "best": min over methods}, acr: {method: ACR}, unstable_relus, n,
                 time_train_s, time_eval_s, train: {numeric summary of train()}},
     "summary": train()'s summary, "eval": evaluate_run()'s dict, "history": the rows of metrics.jsonl}

Errors are fractions in [0, 1]; ACR is a fraction of ε.
"""

from __future__ import annotations

import json
import os
import time


def read_history(run_dir) -> list:
    """The per-epoch rows of ``run_dir/metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def summarize_eval(ev: dict, config: dict) -> dict:
    """Flat-able metrics from an ``evaluate`` dict (see module docstring)."""
    cert = dict(ev.get("certified_error") or {})
    if cert:
        relax = config.get("relaxation")
        if relax in cert:
            cert["train"] = cert[relax]
        cert["best"] = min(v for v in cert.values() if v is not None)
    out = {"clean_error": ev.get("clean_error"), "robust_error": ev.get("robust_error"),
           "certified_error": cert, "acr": dict(ev.get("acr") or {}), "unstable_relus": ev.get("unstable_relus"),
           "n": ev.get("n")}
    acr = {k: v for k, v in out["acr"].items() if v is not None}
    if acr:
        out["acr"]["best"] = max(acr.values())
        relax = config.get("relaxation")
        if relax in acr:
            out["acr"]["train"] = acr[relax]
    return out


def run_cell(config: dict, run_dir: str) -> dict:
    """Train and evaluate one cell in ``run_dir``; see the module docstring for the result."""
    from certlab.train import evaluate_run, train

    os.makedirs(run_dir, exist_ok=True)
    resume = any(os.path.exists(os.path.join(run_dir, f)) for f in ("last.pt", "summary.json"))
    t0 = time.time()
    summary = train(dict(config), run_dir, resume=resume, progress=False) or {}
    t1 = time.time()
    ev = summary.get("eval")
    if not isinstance(ev, dict):  # a train() that does not evaluate: evaluate the run here
        ev = evaluate_run(run_dir)
    t2 = time.time()
    metrics = summarize_eval(ev, config)
    train_s = summary.get("train_time_s")
    metrics.update(time_total_s=t2 - t0, time_train_s=train_s if isinstance(train_s, (int, float)) else t1 - t0,
                   time_eval_s=ev.get("time_s", t2 - t1), resumed=resume)
    last = summary.get("last") or {}
    metrics["train"] = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    summary = {k: v for k, v in summary.items() if k != "eval"}
    return {"metrics": metrics, "summary": summary, "eval": ev, "history": read_history(run_dir)}


def _diag_threat(cfg, info):
    from certlab.threat import ball

    domain = None if info.domain is None else tuple(info.domain)
    return ball(cfg.norm, cfg.final_eval_eps, domain=domain)


def diagnostics_metrics(rows, own: str) -> dict:
    """``diagnose`` rows -> {relaxation: {numeric key: value}} (the yes/no columns continuous and sensitive as
    1.0/0.0) plus the training relaxation's values under ``own``."""
    out = {}
    for row in rows or []:
        if not isinstance(row, dict):
            continue
        name = str(row.get("relaxation", row.get("method", len(out))))
        out[name] = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}  # yes/no: 1.0/0.0
    if own in out:
        out["own"] = dict(out[own])
    return out


def run_cell_diagnostics(config: dict, run_dir: str, n: int = 64, lp_samples: int = 2, grid: int = 11) -> dict:
    """:func:`run_cell`, then ``certlab.verify.diagnostics.diagnose`` (1/gap tightness, continuity and sensitivity
    classes with their probe measurements, loss jump, width, LP gap, …) of the trained model under every
    ``eval_certify`` relaxation on the first ``n`` test points (LP gap on ``lp_samples`` of them, loss jump from a
    ``grid``-point scan on 16 of them); numeric values go to
    ``metrics["diag"][relaxation]`` (``"own"`` = the training relaxation)."""
    result = run_cell(config, run_dir)
    from certlab.train import load_run
    from certlab.train.setup import load_data
    from certlab.verify.diagnostics import diagnose

    model, cfg = load_run(run_dir, which="last")
    _, test, info = load_data(cfg)
    x, y = test.x[:n], test.y[:n]
    relaxations = list(dict.fromkeys([cfg.relaxation, *cfg.eval_certify]))
    rows = diagnose(model, (x, y), _diag_threat(cfg, info), relaxations, n=n, lp_samples=lp_samples, grid=grid)
    result["metrics"]["diag"] = diagnostics_metrics(rows, cfg.relaxation)
    result["diagnostics"] = rows
    return result


def run_cell_crown(config: dict, run_dir: str, n: int | None = None) -> dict:
    """:func:`run_cell`, then the certified error by CROWN on the same test samples, without CROWN's ACR (whose
    radius search costs many CROWN passes): ``metrics["certified_error"]["crown"]``. For trade-off studies that
    measure ACR with a cheap relaxation (``eval_acr`` with ``eval_certify: [ibp]``) and certified accuracy with a
    tighter one."""
    result = run_cell(config, run_dir)
    from certlab.train import evaluate_run

    ev = evaluate_run(run_dir, certify=["crown"], attacks=[], acr=False, n=n, write=False)
    cert = result["metrics"].setdefault("certified_error", {})
    cert["crown"] = ev["certified_error"]["crown"]
    cert["best"] = min(v for k, v in cert.items() if k not in ("best", "train") and v is not None)
    if config.get("relaxation") == "crown":
        cert["train"] = cert["crown"]
    result["metrics"]["time_eval_s"] = result["metrics"].get("time_eval_s", 0) + ev.get("time_s", 0)
    result["eval_crown"] = ev
    return result
