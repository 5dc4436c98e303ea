"""``certlab.evaluate``: clean, empirical-robust and certified error of a model on a dataset, in batches, without
gradients (the attacks take input gradients only).

- clean error: argmax f(x) ≠ y;
- robust error: misclassified clean or by one of ``attacks`` (``certlab.attacks.robust_error``; an upper bound on
  nothing, a lower bound on the true robust error);
- certified error per relaxation: 1 − fraction with every margin lower bound > 0 (an upper bound on the true robust
  error, so certified_error ≥ true robust error ≥ robust_error);
- ACR: mean per-sample certified radius (``certlab.certified_radius``, 0 when misclassified) as a fraction of ε;
- unstable ReLUs (De Bartolomeis et al., Eq. 3): per sample, the number of ReLU neurons whose IBP pre-activation
  interval crosses zero, l < 0 < u, summed over layers; reported as the mean over samples.
"""

from __future__ import annotations

import time

import torch

from certlab.bounds import certify as _certify
from certlab.bounds import resolve_method
from certlab.bounds.engine import relu_bounds
from certlab.errors import CertlabError
from certlab.threat import ThreatSet


def _progress(total, desc, enabled):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def _radius(model, x, y, threat, method, max_eps):
    """Certified radii for the report: full float32 (not the training objective's helper, which keeps the caller's
    precision settings), margins within rounding of zero rechecked in float64."""
    from certlab.verify.radius import certified_radius

    return certified_radius(model, x, y, threat=threat, method=method, max_eps=max_eps, tol=max_eps * 1e-3,
                            solver="brent", recheck=True)


def evaluate(model, dataset, threat, certify=("ibp", "crown"), attacks=("apgd-ce", "apgd-t"), batch_size: int = 256,
             acr=True, device=None, n: int | None = None, attack_opts: dict | None = None, progress: bool = False) -> dict:
    """Evaluate ``model`` on ``dataset`` (an ``ArrayDataset`` or a pair ``(x, y)``) over ``threat``.

    ``threat``: a threat set (its ``eps`` is the evaluation radius; per-sample radii / directions for the whole
    dataset are sliced per batch) or a callable ``x -> ThreatSet``. ``acr``: True (every certify method), False, or a
    list of methods. ``n``: only the first n samples. Returns n, clean_error, robust_error (None without attacks),
    certified_error {method: error}, acr {method: fraction of ε} or None, unstable_relus, time_s.
    """
    t0 = time.perf_counter()
    from certlab import attacks as atk
    from certlab.train.threats import batch_threat

    x_all, y_all = (dataset.x, dataset.y) if hasattr(dataset, "x") else dataset
    if n is not None:
        if n < 1:
            raise CertlabError(f"n must be a positive integer, got {n}")
        x_all, y_all = x_all[:n], y_all[:n]
    N = x_all.shape[0]
    if N == 0:
        raise CertlabError("evaluate: the dataset is empty")
    certify = [resolve_method(m) for m in ([certify] if isinstance(certify, str) else (certify or ()))]
    attacks = [attacks] if isinstance(attacks, str) else list(attacks or ())
    for a in attacks:
        if a not in atk.METHODS:
            raise CertlabError(f"unknown attack {a!r}; choose from {', '.join(atk.METHODS)}")
    acr_methods = certify if acr is True else ([] if not acr else [resolve_method(m) for m in acr])
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CertlabError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    wrong = torch.zeros(N, dtype=torch.bool)
    rob = torch.zeros(N, dtype=torch.bool)
    cert = {m: torch.zeros(N, dtype=torch.bool) for m in certify}
    radii = {m: torch.zeros(N) for m in acr_methods}
    unstable = torch.zeros(N)
    eps_ref = None
    bar = _progress(N, "evaluate", progress)
    try:
        for s in range(0, N, batch_size):
            idx = torch.arange(s, min(N, s + batch_size))
            x = x_all[idx].to(device)
            y = y_all[idx].to(device=device, dtype=torch.long)
            th = batch_threat(threat, x, idx)
            if not isinstance(th, ThreatSet):
                raise CertlabError("threat callable must return a certlab threat set")
            if eps_ref is None:
                e = th.eps
                eps_ref = float(e.max()) if isinstance(e, torch.Tensor) else float(e)
            with torch.no_grad():
                w = model(x).argmax(1) != y
            wrong[idx] = w.cpu()
            if attacks:
                rob[idx] = atk.robust_error(model, x, y, th, attacks=attacks, **(attack_opts or {})).cpu()
            with torch.no_grad():
                for m in certify:
                    cert[m][idx] = _certify(model, x, y, th, method=m).cpu()
                for m in acr_methods:
                    if eps_ref > 0:
                        r = _radius(model, x, y, th, m, eps_ref).float().cpu()
                        radii[m][idx] = torch.where(w.cpu(), torch.zeros_like(r), r)
                bounds = relu_bounds(model, x, th, "ibp")
                cnt = torch.zeros(x.shape[0], device=device)
                for l, u in bounds:
                    cnt += ((l < 0) & (u > 0)).reshape(x.shape[0], -1).sum(1).float()
                unstable[idx] = cnt.cpu()
            bar.update(len(idx))
            shown = {"err": f"{wrong[:idx[-1] + 1].float().mean():.3f}"}
            if certify:
                shown["cert_err"] = f"{1 - cert[certify[0]][:idx[-1] + 1].float().mean():.3f}"
            bar.set_postfix(shown)
    finally:
        bar.close()
        model.train(was_training)
    clean_error = float(wrong.double().mean())
    out = {
        "n": N,
        "eps": eps_ref,
        "clean_error": clean_error,
        "robust_error": float((rob | wrong).double().mean()) if attacks else None,
        "certified_error": {m: float(1 - cert[m].double().mean()) for m in certify},
        "acr": ({m: (float(radii[m].mean()) / eps_ref if eps_ref > 0 else 0.0) for m in acr_methods}
                if acr_methods else None),
        "unstable_relus": float(unstable.mean()),
        "attacks": attacks,
        "time_s": time.perf_counter() - t0,
    }
    return out


def format_table(rows: list[dict], title: str | None = None) -> str:
    """Plain-text table of evaluation results (one row per dict: name + evaluate() keys)."""
    methods = []
    for r in rows:
        for m in (r.get("certified_error") or {}):
            if m not in methods:
                methods.append(m)
    head = ["run", "eps", "clean err", "robust err"] + [f"cert err ({m})" for m in methods]
    has_acr = any(r.get("acr") for r in rows)
    if has_acr:
        head += [f"ACR ({m})" for m in methods]
    head += ["unstable ReLUs", "n"]
    lines = []
    for r in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        row = [str(r.get("name", "")), f"{r.get('eps', 0):g}", pct(r["clean_error"]), pct(r.get("robust_error"))]
        row += [pct((r.get("certified_error") or {}).get(m)) for m in methods]
        if has_acr:
            a = r.get("acr") or {}
            row += ["-" if a.get(m) is None else f"{a[m]:.3f}" for m in methods]
        row += [f"{r.get('unstable_relus', 0):.1f}", str(r.get("n", ""))]
        lines.append(row)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [title] if title else []
    out += [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines]
    return "\n".join(out)
