"""Training: standard, adversarial (PGD / APGD / TRADES), certified (any relaxation), adaptive (ACERT), SABR, TAPS,
STAPS, MTL-IBP, EXP-IBP and CC-IBP objectives in one loop, with schedules, checkpoints and resumable run directories. See docs/training.md.

    summary = certlab.train.train(TrainConfig(dataset="spheres", model="mlp", objective="certified"), "runs/x")
    model, cfg = certlab.train.load_run("runs/x")
    res = certlab.train.evaluate_run("runs/x", eps=0.1)
"""

from certlab.train.config import TrainConfig  # noqa: F401
from certlab.train.loop import train  # noqa: F401
from certlab.train.run import evaluate_run, load_run  # noqa: F401
from certlab.train.compare import quick_compare  # noqa: F401

__all__ = ["TrainConfig", "train", "load_run", "evaluate_run", "quick_compare"]
