"""The threat set of a run for a batch: ``LinfBall`` / ``L2Ball`` on the dataset's domain, or a ``SegmentUnion``
B_{ε,k}: with ``dirs="random"`` (the default) along k seeded orthonormal directions shared by every sample, nested
in k (De Bartolomeis et al. 2023's construction, on every dataset); with ``dirs="signal"`` along the dataset's
signal directions (for ``spheres`` each point's radial direction plus k − 1 orthogonal to it; elsewhere the same
k seeded orthonormal directions as ``random``)."""

from __future__ import annotations

import torch

from certlab import data as cdata
from certlab import threat as _threat
from certlab.errors import CertlabError, InputError
from certlab.threat import ThreatSet
from certlab.train.config import SEGMENT_DIRS


class ThreatMaker:
    """``maker(x, eps)`` -> the run's threat set around the batch ``x`` with radius ``eps`` (float or [B] tensor)."""

    def __init__(self, norm: str, dataset: str, info, k: int = 1, seed: int = 0, dirs: str = "random"):
        try:
            _threat.kind(norm)
        except InputError as e:
            raise CertlabError(str(e)) from None
        if dirs not in SEGMENT_DIRS:
            raise CertlabError(f"unknown segment directions {dirs!r}; choose one of {', '.join(SEGMENT_DIRS)}")
        self.norm, self.dataset, self.info, self.k, self.seed, self.dirs = norm, dataset, info, k, seed, dirs
        self.domain = None if info.domain is None else tuple(info.domain)
        self._dirs = None

    def directions(self, x: torch.Tensor) -> torch.Tensor:
        if self.dataset == "spheres" and self.dirs == "signal":
            return cdata.signal_directions("spheres", self.k, self.seed, x=x)
        if self._dirs is None or self._dirs.device != x.device:
            self._dirs = cdata.orthonormal(tuple(x.shape[1:]), self.k, self.seed, device=x.device, dtype=x.dtype) \
                if self.dirs == "random" else cdata.signal_directions(self.dataset, self.k, self.seed, x=x)
        return self._dirs

    def __call__(self, x: torch.Tensor, eps) -> ThreatSet:
        return _threat.make(self.norm, eps, domain=self.domain, directions=lambda: self.directions(x))


def batch_threat(threat, x: torch.Tensor, idx: torch.Tensor | slice | None = None) -> ThreatSet:
    """The threat set for the batch ``x`` (rows ``idx`` of a dataset).

    ``threat`` is a :class:`ThreatSet` or a callable ``x -> ThreatSet``. A set holding per-sample radii or per-sample
    segment directions for the whole dataset is sliced to the rows ``idx``."""
    if not isinstance(threat, ThreatSet):
        if callable(threat):
            return threat(x)
        raise CertlabError(f"threat must be a certlab threat set or a callable x -> set, got {type(threat).__name__}")
    return threat if idx is None else threat.take(x, idx)
