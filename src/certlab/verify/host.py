"""The complete verifiers that call HiGHS (MILP, LP) solve numpy problems and evaluate a float64 copy of the model
on the CPU. :func:`on_cpu` lets them take a model and tensors on any device: it runs the verifier on CPU copies
(the caller's model is never moved) and puts the tensors it returns — bounds, counterexamples — back on the device
of the caller's ``x``."""

from __future__ import annotations

import copy
import functools
import itertools

import torch

from certlab.verify.result import Result


def _off_cpu(model, tensors) -> bool:
    params = itertools.chain(model.parameters(), model.buffers()) if isinstance(model, torch.nn.Module) else ()
    return any(t.device.type != "cpu" for t in itertools.chain(params, tensors))


def _back(out, device):
    if isinstance(out, torch.Tensor):
        return out.to(device)
    if isinstance(out, Result):
        if out.counterexample is not None:
            out.counterexample = out.counterexample.to(device)
        return out
    if isinstance(out, (list, tuple)):
        return type(out)(_back(o, device) for o in out)
    return out


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` on the CPU, made without a second copy of its tensors on their own device (the
    parameters and buffers are copied straight to the CPU; tied ones stay tied)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        c = t.detach().to("cpu", copy=True)
        memo[id(t)] = torch.nn.Parameter(c, t.requires_grad) if isinstance(t, torch.nn.Parameter) else c
    return copy.deepcopy(model, memo)


def on_cpu(fn):
    """Decorator for ``fn(model, x, ...)``: when the model or any tensor argument lives off the CPU, call ``fn`` on
    a CPU copy of the model and CPU copies of the tensors, and return its tensors on ``x``'s device."""

    @functools.wraps(fn)
    def wrapper(model, x, *args, **kw):
        tensors = [a for a in itertools.chain((x,), args, kw.values()) if isinstance(a, torch.Tensor)]
        if not _off_cpu(model, tensors):
            return fn(model, x, *args, **kw)
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        cpu = lambda a: a.cpu() if isinstance(a, torch.Tensor) else a  # noqa: E731
        host = cpu_copy(model) if isinstance(model, torch.nn.Module) else model
        out = fn(host, cpu(x), *map(cpu, args), **{k: cpu(v) for k, v in kw.items()})
        return _back(out, device)

    return wrapper
