"""Shared pieces of the attacks: input checks, losses, gradients, the best-point tracker and the final projection.

Notation: logits ``z = f(x)`` of shape ``[B, K]``, labels ``y`` of shape ``[B]``.

- margin ``m(z, y) = z_y − max_{j≠y} z_j``; the point is misclassified when ``argmax z ≠ y`` (then ``m ≤ 0``);
- DLR (Croce & Hein 2020): ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12)`` with ``π`` the logits sorted
  decreasingly (scale 1 when ``K < 3``);
- targeted DLR towards class ``t``: ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)``
  (``z_π1 − z_π3`` when ``K = 3``, scale 1 when ``K = 2``).

All losses are per sample (``[B]``) and are *maximised* by the attacks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from certlab.attacks.kernels import input_grad, recording
from certlab.errors import CertlabError, InputError
from certlab.threat import ThreatSet


# -- validation ---------------------------------------------------------------------------------------------
def check_inputs(model, x, y, threat) -> None:
    """Raise :class:`InputError` for a bad model/x/y/threat combination (before any work is done)."""
    if not callable(model):
        raise InputError(f"model must be a callable (torch.nn.Module), got {type(model).__name__}")
    if not isinstance(threat, ThreatSet):
        raise InputError("threat must be a certlab.threat set (LinfBall, L2Ball, SegmentUnion, Box), "
                         f"got {type(threat).__name__}")
    threat.validate(x)
    if not isinstance(y, torch.Tensor):
        raise InputError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InputError(f"y must hold integer class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (x.shape[0],):
        raise InputError(f"y must have shape [{x.shape[0]}] (one label per sample), got {tuple(y.shape)}")


def check_logits(z: torch.Tensor, y: torch.Tensor) -> None:
    """The model output must be finite logits ``[B, K]`` with ``K ≥ 2`` and labels in ``[0, K)``."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != y.shape[0]:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(f"model must return logits of shape [B, K], got {shape} for a batch of {y.shape[0]}")
    if z.shape[1] < 2:
        raise InputError(f"model must return at least 2 logits per sample, got {z.shape[1]}")
    if not torch.isfinite(z).all():
        raise InputError("model returned NaN or inf logits on the clean input")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
        raise InputError(f"labels must lie in [0, {z.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# -- model mode -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model):
    """Put every submodule in eval mode and restore each one's previous mode afterwards."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


def generator_for(x: torch.Tensor, seed: int) -> torch.Generator:
    """A private RNG on x's device: attacks never touch the global random state."""
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    return g


# -- losses -----------------------------------------------------------------------------------------------
def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y − max_{j≠y} z_j`` per sample."""
    zy = z.gather(1, y.view(-1, 1)).squeeze(1)
    other = z.scatter(1, y.view(-1, 1), float("-inf"))
    return zy - other.max(1).values


def misclassified(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return z.argmax(1) != y


def ce_loss(z, y):
    return F.cross_entropy(z, y, reduction="none")


def dlr_loss(z, y):
    K = z.shape[1]
    if K >= 3:
        s = z.sort(1, descending=True).values
        scale = s[:, 0] - s[:, 2] + 1e-12
    else:
        scale = torch.ones_like(z[:, 0])
    return -margin(z, y) / scale


def dlr_targeted_loss(z, y, t):
    K = z.shape[1]
    zy = z.gather(1, y.view(-1, 1)).squeeze(1)
    zt = z.gather(1, t.view(-1, 1)).squeeze(1)
    if K >= 4:
        s = z.sort(1, descending=True).values
        scale = s[:, 0] - (s[:, 2] + s[:, 3]) / 2 + 1e-12
    elif K == 3:
        s = z.sort(1, descending=True).values
        scale = s[:, 0] - s[:, 2] + 1e-12
    else:
        scale = torch.ones_like(zy)
    return -(zy - zt) / scale


def neg_margin_loss(z, y):
    return -margin(z, y)


LOSSES = {"ce": ce_loss, "dlr": dlr_loss, "margin": neg_margin_loss}


def loss_and_grad(model, x: torch.Tensor, loss_fn):
    """Per-sample loss ``[B]``, its gradient w.r.t. x, and the logits; gradients reach only the input."""
    with torch.enable_grad():
        xv = x.detach().requires_grad_(True)
        with recording(model, xv):
            z = model(xv)
        loss = loss_fn(z)
        g = input_grad(model, loss.sum(), xv) if loss.requires_grad else None
    if g is None:
        g = torch.zeros_like(x)
    g = torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    return loss.detach(), g, z.detach()


# -- steps --------------------------------------------------------------------------------------------------
def bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against x."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def random_start(threat, x, generator):
    """A uniformly random point of the set (the balls' own sampler, domain clipping included)."""
    return threat.project(threat.sample(x, 1, generator=generator)[0], x)


class Best:
    """Per-sample best point so far: the lowest margin ``z_y − max_{j≠y} z_j``.

    ``fooled`` records whether the stored point is misclassified (``argmax z ≠ y``).
    """

    def __init__(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor):
        self.x = x.detach().clone()
        self.m = margin(z, y)
        self.fooled = misclassified(z, y)
        self.y = y

    def update(self, x: torch.Tensor, z: torch.Tensor) -> None:
        m = margin(z, self.y)
        better = m < self.m
        if better.any():
            self.x[better] = x[better].detach()
            self.m = torch.where(better, m, self.m)
            self.fooled = torch.where(better, misclassified(z, self.y), self.fooled)

    def merge(self, other: "Best", idx: torch.Tensor) -> None:
        """Take ``other`` (a tracker over the samples ``idx``) where it is better."""
        better = other.m < self.m[idx]
        if better.any():
            sel = idx[better]
            self.x[sel] = other.x[better]
            self.m[sel] = other.m[better]
            self.fooled[sel] = other.fooled[better]


def finish(threat, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Project into the set one last time, clamp to the domain and verify membership; the result is detached."""
    out = threat.project(x_adv.detach(), x)
    if threat.domain is not None:  # exact domain membership despite rounding; clamping never moves away from x
        out = out.clamp(threat.domain[0], threat.domain[1])
    ok = threat.contains(out, x)
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise CertlabError(f"attack produced {bad} point(s) outside the threat set {threat!r} after projection")
    return out.detach()
