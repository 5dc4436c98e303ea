"""One entry point for every verifier: ``verify_complete`` (bab / milp / lp) and ``verify_any`` (also the incomplete
relaxations, completed by attacks).

    results = certlab.verify.complete.verify_complete(model, x, y, LinfBall(0.1), method="bab", timeout=10)
    [r.status for r in results]  # "verified" | "falsified" | "unknown"

Every "falsified" carries a counterexample inside the set that the model misclassifies (re-checked before returning).
"""

from __future__ import annotations

import time

import torch

from certlab.bounds.api import METHODS, certify, resolve_method
from certlab.errors import InputError
from certlab.verify.result import Result, attack_subset  # noqa: F401 (attack_subset: also complete.attack_subset)

COMPLETE = ("bab", "milp", "lp")


def verify_complete(model, x, y, threat, method: str = "bab", timeout: float = 30.0, **kw) -> list:
    """Complete verification, one :class:`Result` per sample. ``method``: "bab" (branch and bound), "milp" (exact
    MILP) or "lp" (triangle LP: only verified/unknown). ``timeout`` in seconds per sample; ``**kw`` go to the method
    (bab: max_nodes, batch, attack, pgd_every, leaf_milp; milp: attack, pre; lp: pre, refine)."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if method == "bab":
        from certlab.verify import bab

        return bab.verify(model, x, y, threat, timeout=timeout, **kw)
    if method == "milp":
        from certlab.verify import milp

        return milp.verify(model, x, y, threat, timeout=timeout, **kw)
    if method == "lp":
        from certlab.verify import lp

        return lp.verify(model, x, y, threat, timeout=timeout, **kw)
    raise InputError(f"unknown complete verifier {method!r}; choose one of {', '.join(COMPLETE)}")


def verify_any(model, x, y, threat, method: str = "crown", timeout: float = 30.0,
               attacks=("apgd-ce", "apgd-t"), **kw) -> list:
    """Like :func:`verify_complete`, and for a relaxation in ``certlab.METHODS``: "verified" where it certifies,
    "falsified" where an attack (``attacks``) finds a misclassified point, else "unknown"."""
    if method in COMPLETE:
        return verify_complete(model, x, y, threat, method, timeout, **kw)
    name = resolve_method(method)
    t0 = time.perf_counter()
    with torch.no_grad():
        cert = certify(model, x, y, threat, name, **kw)
    t1 = time.perf_counter()
    out = [None] * x.shape[0]
    todo = (~cert).nonzero().flatten()
    found = {}
    if todo.numel() and attacks:
        found = attack_subset(model, x, y, threat, todo, attacks)
    t2 = time.perf_counter()
    B = max(x.shape[0], 1)
    for i in range(x.shape[0]):
        if bool(cert[i]):
            out[i] = Result("verified", None, (t1 - t0) / B, 0, None, name)
        elif i in found:
            out[i] = Result("falsified", found[i], (t2 - t0) / B, 0, None, name)
        else:
            out[i] = Result("unknown", None, (t2 - t0) / B, 0, None, name)
    return out


ALL_METHODS = COMPLETE + METHODS
