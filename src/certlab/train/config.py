"""``TrainConfig``: every knob of a training run as one flat dataclass (YAML/JSON friendly: only plain types).

``TrainConfig.from_dict(d)`` rejects unknown keys; ``validate()`` checks values and raises
:class:`certlab.CertlabError` with a one-line message naming the bad field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import yaml

from certlab.errors import CertlabError
from certlab.fileio import write_text
from certlab.train.schedules import AUTO

OBJECTIVES = ("standard", "pgd", "trades", "certified", "adaptive", "sabr", "taps", "staps", "mtl-ibp", "exp-ibp",
              "cc-ibp")
ATTACKING = ("pgd", "trades", "sabr", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")  # objectives that run cfg.attack
NORMS = ("linf", "l2", "segments")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("none", "step", "multistep", "onecycle")
EPS_SCHEDULES = ("linear", "smoothed")
DEVICES = ("cpu", "cuda")
SEGMENT_DIRS = ("signal", "random")


@dataclass
class TrainConfig:
    # data and model
    dataset: str = "spheres"
    data: dict = field(default_factory=dict)
    root: str | None = None
    model: str = "mlp"
    model_params: dict = field(default_factory=dict)
    normalize: bool = True
    # objective and threat
    objective: str = "standard"
    relaxation: str = "ibp"
    norm: str = "linf"
    eps: float = 0.1
    k: int = 1
    segment_dirs: str = "random"  # segments: k seeded random orthonormal ones, nested in k (B_eps,k), or "signal"
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "none"
    lr_milestones: list = field(default_factory=list)
    lr_gamma: float = 0.1
    # schedules of the robust objectives (epochs may be fractional; schedules advance per step). None = auto:
    # the default recipe of the certified-type objectives, else no ramp (schedules.resolve decides; docs/training.md)
    eps_schedule: str | None = None
    eps_start_epoch: float | None = None
    eps_ramp_epochs: float | None = None
    kappa_start: float | None = None
    kappa_end: float | None = None
    beta_start: float = 1.0
    beta_end: float = 1.0
    # adversarial training
    attack: str = "pgd"
    attack_steps: int = 10
    attack_restarts: int = 1
    attack_step: float | None = None  # pgd step size as a multiple of ε (None: the attack's default 2.5/steps)
    trades_beta: float = 6.0
    # certified-training extras
    fast_ibp_reg: bool = False
    reg_weight: float = 0.5
    ibp_init: bool | None = None  # None: auto (True for sabr/taps/staps/mtl-ibp/exp-ibp/cc-ibp; schedules.resolve)
    grad_clip: float | None = None
    # state-of-the-art certified training (sabr, taps, staps, mtl-ibp, exp-ibp, cc-ibp); see docs/training.md
    sabr_lambda: float = 0.4  # radius of SABR's (and STAPS's) small set as a fraction of ε, in (0, 1]
    taps_head: int = 1  # top-level ReLU layers in the head TAPS searches by PGD (0: the affine layers after the last)
    taps_grad_scale: float = 4.0  # w: the TAPS factor's gradient is multiplied by w (its value is not)
    taps_threshold: float = 0.5  # c of the gradient connector, in (0, 1]
    taps_ibp_mult: bool = True  # multiply the TAPS loss by the certified loss (as the authors do)
    taps_targets: int = 0  # classes the latent search covers per sample (the k most violated); 0: all K − 1
    cert_alpha: float = 0.5  # α of mtl-ibp / exp-ibp / cc-ibp: weight of the certified part, in [0, 1]
    # reproducibility and hardware
    seed: int = 0
    device: str = "cpu"
    # final evaluation
    eval_eps: float | None = None
    eval_certify: list = field(default_factory=lambda: ["ibp", "crown"])
    eval_attacks: list = field(default_factory=lambda: ["apgd-ce", "apgd-t"])
    eval_restarts: int = 1  # random restarts of each evaluation attack (later ones re-attack only the unfooled)
    eval_n: int | None = None
    eval_acr: bool = False
    val_n: int = 500  # samples for per-epoch validation and model selection (best.pt)
    val_split: int = 0  # >0: hold out this many training samples (not trained on) for it; 0: first val_n test samples

    def __post_init__(self):
        self.validate()

    # -- conversion ----------------------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> dict:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.fields()))
        if unknown:
            raise CertlabError(f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainConfig":
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CertlabError(f"config is not valid YAML: {str(e).splitlines()[0]}") from None
        if d is not None and not isinstance(d, dict):
            raise CertlabError("config YAML must be a mapping of option: value")
        return cls.from_dict(d)

    @classmethod
    def load(cls, path) -> "TrainConfig":
        return cls.from_dict(read_yaml(path))

    def save(self, path) -> None:
        atomic_write_text(path, self.to_yaml())

    # -- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        from certlab.bounds import METHODS, PARAMETRISED, loosebox, resolve_method

        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise CertlabError(f"unknown {name} {v!r}; choose one of {', '.join(options)}")

        def number(name, lo=None, strict=False, integer=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type or not math.isfinite(v):
                raise CertlabError(f"{name} must be a{'n integer' if integer else ' finite number'}, got {v!r}")
            if lo is not None and (v <= lo if strict else v < lo):
                raise CertlabError(f"{name} must be {'>' if strict else '>='} {lo}, got {v!r}")

        for name in ("dataset", "model"):
            if not isinstance(getattr(self, name), str):
                raise CertlabError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("data", "model_params"):
            if not isinstance(getattr(self, name), dict):
                raise CertlabError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        for name in AUTO:  # "auto" (YAML, command line) is the same as leaving the field unset
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() == "auto":
                setattr(self, name, None)
        choice("objective", OBJECTIVES)
        choice("norm", NORMS)
        choice("optimizer", OPTIMIZERS)
        choice("lr_schedule", LR_SCHEDULES)
        if self.eps_schedule is not None:
            choice("eps_schedule", EPS_SCHEDULES)
        choice("device", DEVICES)
        choice("segment_dirs", SEGMENT_DIRS)
        try:
            self.relaxation = resolve_method(self.relaxation)
        except CertlabError as e:
            if loosebox.is_loosebox(self.relaxation):  # a loose Box with bad parameters: its own message
                raise CertlabError(str(e)) from None
            raise CertlabError(f"unknown relaxation {self.relaxation!r}; choose one of "
                               f"{', '.join(METHODS + PARAMETRISED)}") from None
        for name in ("eval_certify", "eval_attacks", "lr_milestones"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, [s for s in v.split(",") if s])
            elif not isinstance(v, (list, tuple)):
                raise CertlabError(f"{name} must be a list, got {v!r}")
            else:
                setattr(self, name, list(v))
        self.eval_certify = [resolve_method(m) for m in self.eval_certify]
        number("eps", 0.0)
        number("eval_eps", 0.0, optional=True)
        for name in ("epochs", "batch_size", "k", "attack_steps", "attack_restarts", "eval_restarts", "val_n"):
            number(name, 1, integer=True)
        number("eval_n", 1, integer=True, optional=True)
        number("val_split", 0, integer=True)
        number("seed", 0, integer=True)
        number("lr", 0.0, strict=True)
        for name in ("momentum", "weight_decay", "lr_gamma", "trades_beta", "reg_weight"):
            number(name, 0.0)
        for name in ("eps_start_epoch", "eps_ramp_epochs"):
            number(name, 0.0, optional=True)
        number("grad_clip", 0.0, strict=True, optional=True)
        number("attack_step", 0.0, strict=True, optional=True)
        for name in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
            number(name, 0.0, optional=name.startswith("kappa"))
            if getattr(self, name) is not None and getattr(self, name) > 1:
                raise CertlabError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        number("taps_head", 0, integer=True)
        number("taps_targets", 0, integer=True)
        number("taps_grad_scale", 0.0, strict=True)
        for name in ("sabr_lambda", "taps_threshold", "cert_alpha"):
            number(name, 0.0, strict=name != "cert_alpha")
            if getattr(self, name) > 1:
                raise CertlabError(f"{name} must lie in {'[0' if name == 'cert_alpha' else '(0'}, 1], "
                                   f"got {getattr(self, name)!r}")
        for name in ("normalize", "fast_ibp_reg", "ibp_init", "eval_acr", "taps_ibp_mult"):
            if not isinstance(getattr(self, name), bool) and not (name == "ibp_init" and self.ibp_init is None):
                raise CertlabError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.root is not None and not isinstance(self.root, str):
            raise CertlabError(f"root must be a path string, got {self.root!r}")
        for m in self.lr_milestones:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise CertlabError(f"lr_milestones must be positive integers (epochs), got {self.lr_milestones!r}")
        if self.lr_schedule in ("step", "multistep") and not self.lr_milestones:
            raise CertlabError(f"lr_schedule {self.lr_schedule!r} needs lr_milestones")
        if self.objective in ATTACKING:
            from certlab.attacks import METHODS as ATTACKS

            if self.attack not in ATTACKS:
                raise CertlabError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        if self.attack_step is not None and self.attack != "pgd":
            raise CertlabError(f"attack_step applies to attack 'pgd' only, not {self.attack!r}")
        from certlab.threat import kind as threat_kind  # torch loads only once a config is checked

        if self.objective == "trades" and not threat_kind(self.norm).gradient_attacks:
            raise CertlabError(f"objective 'trades' is not available for norm {self.norm!r}; use pgd or certified")
        if self.objective in ("sabr", "staps") and not threat_kind(self.norm).recentres and self.k > 1:
            raise CertlabError(f"objective {self.objective!r} needs k=1 on norm {self.norm!r}: a union of k>1 segments "
                               "moved off its centre leaves the threat set, so there is no small set to propagate")

    def resolved(self) -> "TrainConfig":
        """This config with its auto (None) schedule fields filled in by :func:`certlab.train.schedules.resolve`."""
        from certlab.train import schedules

        return schedules.resolve(self)

    @property
    def final_eval_eps(self) -> float:
        return self.eps if self.eval_eps is None else self.eval_eps


def read_yaml(path) -> dict:
    if not os.path.isfile(path):
        raise CertlabError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise CertlabError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise CertlabError(f"{path} must hold a mapping of option: value")
    return d


def atomic_write_text(path, text: str) -> None:
    """``fileio.write_text`` with fsync: the run's files that a resumed run reads."""
    write_text(path, text, fsync=True)
