"""The one call shape of every attack: ``run(model, x, y, threat, method=...) -> x_adv`` and the ensemble
``robust_error``.

Conventions shared by all methods:

- the model runs in eval mode during the attack; each submodule's mode is restored afterwards;
- gradients are taken with respect to the input only (``torch.autograd.grad``), parameter ``.grad`` is untouched;
- the returned point is the iterate with the lowest margin ``f_y − max_{j≠y} f_j`` (the clean point included), so it
  is misclassified whenever any visited point was; it is projected into the set and checked with ``threat.contains``;
- restarts (and APGD-T targets after the first) only re-attack samples that are still correctly classified;
- random starts use a private generator seeded with ``seed`` (the global RNG is untouched).
"""

from __future__ import annotations

import time

import torch

from certlab.attacks.apgd import apgd, target_classes
from certlab.attacks.base import (
    Best,
    check_inputs,
    check_logits,
    check_positive_int,
    eval_mode,
    finish,
    generator_for,
    misclassified,
)
from certlab.attacks.pgd import pgd
from certlab.attacks.segment import segment_search
from certlab.errors import InputError

METHODS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "segment")
DEFAULT_STEPS = {"pgd": 20, "apgd-ce": 100, "apgd-dlr": 100, "apgd-t": 100}
_SEGMENT_OPTS = {"grid", "refine", "refine_points", "chunk"}
_OPTS = {
    "pgd": {"step_size", "loss", "rand_init"},
    "apgd-ce": {"rho", "momentum", "rand_init"},
    "apgd-dlr": {"rho", "momentum", "rand_init"},
    "apgd-t": {"rho", "momentum", "rand_init", "n_targets"},
    "segment": _SEGMENT_OPTS,
}


def _check_method(method) -> str:
    if method not in METHODS:
        raise InputError(f"unknown attack method {method!r}; choose from {', '.join(METHODS)}")
    return method


def _still_robust(best: Best) -> torch.Tensor:
    return (~best.fooled).nonzero().squeeze(1)


def _gradient_attack(model, x, y, threat, method, steps, restarts, gen, best, z0, opts):
    """Run a ball attack with restarts; the first pass covers every sample, later ones only the unfooled."""
    n_targets = opts.pop("n_targets", 9)
    deadline = opts.pop("deadline", None)
    if method == "apgd-t":
        check_positive_int("n_targets", n_targets)
        targets = target_classes(z0, y, n_targets)
        passes = [targets[:, i] for i in range(targets.shape[1])]
    else:
        passes = [None]
    first = True
    for tgt in passes:
        for _ in range(restarts):
            if first:
                idx = torch.arange(x.shape[0], device=x.device)
                first = False
            else:
                idx = _still_robust(best)
            if idx.numel() == 0 or (deadline is not None and time.perf_counter() > deadline):
                return
            xs, ys, ts = x[idx], y[idx], threat.subset(x, idx)
            if method == "pgd":
                sub = pgd(model, xs, ys, ts, gen, steps=steps, deadline=deadline, **opts)
            else:
                loss = "dlr" if method == "apgd-dlr" else "ce"
                sub = apgd(model, xs, ys, ts, gen, steps=steps, loss=loss,
                           target=None if tgt is None else tgt[idx], deadline=deadline, **opts)
            best.merge(sub, idx)


def run(model, x, y, threat, method: str = "apgd-ce", steps: int | None = None, restarts: int = 1, seed: int = 0,
        **kw) -> torch.Tensor:
    """Attack ``model`` at ``(x, y)`` over ``threat``; returns ``x_adv`` (same shape as x) inside the set.

    ``method`` in :data:`METHODS`. On a :class:`~certlab.threat.SegmentUnion` every method runs the exact line
    search (``segment``); on a ball ``segment`` is refused. ``steps`` defaults to 20 (pgd) / 100 (apgd-*).
    Extra options: pgd ``step_size`` (default 2.5·ε/steps), ``loss`` ("ce", "dlr", "margin"), ``rand_init``;
    apgd ``rho`` (0.75), ``momentum`` (0.75), ``rand_init``; apgd-t ``n_targets`` (9); segment ``grid`` (101),
    ``refine`` (3), ``refine_points`` (21), ``chunk`` (8192). Any method: ``deadline``, a ``time.perf_counter()``
    value after which the gradient attacks stop and return the best points so far (callers with a time budget).
    """
    return run_with_clean_logits(model, x, y, threat, method, steps, restarts, seed, **kw)[0]


def run_with_clean_logits(model, x, y, threat, method: str = "apgd-ce", steps: int | None = None, restarts: int = 1,
                          seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run`, also returning the eval-mode logits of the clean x that the attack computes anyway (adversarial
    training reports clean accuracy from them instead of a second forward pass)."""
    _check_method(method)
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 0:
        return x.detach().clone(), x.new_zeros(0)  # an empty batch has nothing to attack
    check_inputs(model, x, y, threat)
    check_positive_int("restarts", restarts)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    segments = not threat.gradient_attacks  # the exact line search instead
    if method == "segment" and not segments:
        raise InputError(f"method 'segment' needs a SegmentUnion threat, got {type(threat).__name__}; "
                         "use pgd or apgd-* on balls")
    allowed = _OPTS[method] | (_SEGMENT_OPTS if segments else set()) | {"deadline"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)} for attack {method!r}; allowed: {sorted(allowed)}")
    deadline = kw.get("deadline")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or deadline != deadline):
        raise InputError(f"deadline must be a time.perf_counter() value (a number) or None, got {deadline!r}")
    if not segments:
        steps = DEFAULT_STEPS[method] if steps is None else check_positive_int("steps", steps)
    y = y.to(device=x.device, dtype=torch.long)
    x = x.detach()
    with eval_mode(model), torch.no_grad():
        z0 = model(x)
        check_logits(z0, y)
        best = Best(x, z0, y)
        if segments:
            opts = {k: v for k, v in kw.items() if k in _SEGMENT_OPTS}  # the line search ends on its own
            for name in opts:
                check_positive_int(name, opts[name], 2 if name in ("grid", "refine_points") else
                                   (0 if name == "refine" else 1))
            best.merge(segment_search(model, x, y, threat, **opts), torch.arange(x.shape[0], device=x.device))
        else:
            gen = generator_for(x, seed)
            _gradient_attack(model, x, y, threat, method, steps, restarts, gen, best, z0, dict(kw))
        return finish(threat, best.x, x), z0


def attack_success(model, x_adv, y) -> torch.Tensor:
    """BoolTensor [B]: the model (in eval mode) misclassifies ``x_adv`` (``argmax f(x_adv) ≠ y``)."""
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x_adv.shape[0],):
        raise InputError(f"y must be a tensor of shape [{x_adv.shape[0]}]")
    with eval_mode(model), torch.no_grad():
        z = model(x_adv)
        check_logits(z, y.to(device=x_adv.device, dtype=torch.long))
        return misclassified(z, y.to(device=x_adv.device, dtype=torch.long))


def robust_error(model, x, y, threat, attacks=("apgd-ce", "apgd-t"), return_adv: bool = False, **kw):
    """BoolTensor [B]: True where the sample is misclassified clean or by some attack of ``attacks`` (in order;
    each later attack only runs on samples still correctly classified). Options ``**kw``: steps, restarts and seed go
    to every attack, any other option to the attacks that take it (an option none of them takes is an error). With ``return_adv`` also returns the points (the successful adversarial point, else x).
    """
    if isinstance(attacks, str):
        attacks = (attacks,)
    if not attacks:
        raise InputError("attacks must name at least one method")
    for a in attacks:
        _check_method(a)
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=x.device)
        return (empty, x.detach().clone()) if return_adv else empty
    check_inputs(model, x, y, threat)
    y = y.to(device=x.device, dtype=torch.long)
    x = x.detach()
    with eval_mode(model), torch.no_grad():
        z0 = model(x)
        check_logits(z0, y)
        err = misclassified(z0, y)
    x_adv = x.clone()
    segments = not threat.gradient_attacks
    # an option goes to the attacks that take it (e.g. n_targets only to apgd-t); one no attack takes is an error
    generic = {"steps", "restarts", "seed", "deadline"}
    takes = {a: generic | _OPTS[a] | (_SEGMENT_OPTS if segments else set()) for a in attacks}
    unknown = sorted(set(kw) - set().union(*takes.values()))
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)} for attacks {', '.join(attacks)}")
    if segments:  # every method is the same exact line search there
        attacks = ("segment",)
        takes["segment"] = generic | _SEGMENT_OPTS
    for a in attacks:
        kw_a = {k: v for k, v in kw.items() if k in takes[a]}
        if segments:
            xa = run(model, x, y, threat, method=a, **kw_a)  # per-sample directions cannot be subset generically
            hit = attack_success(model, xa, y) & ~err
            x_adv[hit] = xa[hit]
            err |= hit
            continue
        idx = (~err).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = run(model, x[idx], y[idx], threat.subset(x, idx), method=a, **kw_a)
        hit = attack_success(model, xa, y[idx])
        x_adv[idx[hit]] = xa[hit]
        err[idx[hit]] = True
    return (err, x_adv) if return_adv else err
