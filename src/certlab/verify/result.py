"""The answer of a complete verifier for one sample, and the counterexamples behind a "falsified"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from certlab.attacks.api import robust_error
from certlab.attacks.base import eval_mode

STATUSES = ("verified", "falsified", "unknown")


@dataclass
class Result:
    """``status`` in {"verified", "falsified", "unknown"}; ``counterexample`` (a point of the set, shape of one
    sample, misclassified by the model) only when falsified; ``time`` in seconds; ``nodes`` explored (MILP/BaB
    nodes or solver calls); ``bound``: a proven lower bound on the worst margin f_y − f_j over the set where one is
    known (milp/lp: the solver's; bab: when unknown, the worst open subdomain's), else None."""

    status: str
    counterexample: torch.Tensor | None = None
    time: float = 0.0
    nodes: int = 0
    bound: float | None = None
    method: str = ""

    def to_dict(self) -> dict:
        return {"status": self.status, "time": round(self.time, 4), "nodes": int(self.nodes),
                "bound": None if self.bound is None else float(self.bound), "method": self.method,
                "has_counterexample": self.counterexample is not None}


def check_counterexample(model, x, y, threat, b: int, z: torch.Tensor) -> torch.Tensor | None:
    """``z`` (one sample) moved into the set around ``x[b]`` if it is misclassified there, else None."""
    xb = x[b:b + 1]
    z = z.reshape(xb.shape).to(device=x.device, dtype=x.dtype)
    if threat.is_box:  # a clamp: exact, and it only moves z by rounding
        z = threat.project(z, xb)
    if not bool(threat.contains(z, xb, tol=1e-6)[0]):
        z = threat.project(z, xb)
        if not bool(threat.contains(z, xb, tol=1e-6)[0]):
            return None
    with eval_mode(model), torch.no_grad():
        out = model(z)
    if int(out.argmax(1)[0]) != int(y[b]):
        return z[0].detach()
    return None


def attack_subset(model, x, y, threat, idx, attacks=("apgd-ce", "apgd-t"), deadline=None) -> dict:
    """{i: checked counterexample} for the samples i in ``idx`` that an attack of ``attacks`` fools (the attacks
    stop at ``deadline``, a ``time.perf_counter()`` value, when given)."""
    found = {}
    if idx.numel() == 0:
        return found
    err, adv = robust_error(model, x[idx], y[idx], threat.subset(x, idx), attacks=attacks, return_adv=True,
                            deadline=deadline)
    for n, i in enumerate(idx.tolist()):
        if err[n]:
            one = torch.tensor([i], device=x.device)
            z = check_counterexample(model, x[one], y[one], threat.subset(x, one), 0, adv[n])
            if z is not None:
                found[i] = z
    return found
