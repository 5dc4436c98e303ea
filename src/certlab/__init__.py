"""certlab: sound bounds, certified and adversarial training, attacks, verification and robustness studies."""

__version__ = "0.1.0"

# The public names below are imported on first use (PEP 562), so ``import certlab`` alone does not import torch:
# the ``certlab`` command applies its memory settings (certlab.runtime) before torch loads.
import importlib as _importlib

_EXPORTS = {
    "CertlabError": "certlab.errors",
    "UnsupportedLayerError": "certlab.errors",
    "InputError": "certlab.errors",
    "DataError": "certlab.errors",
    "CheckpointError": "certlab.errors",
    "LinfBall": "certlab.threat",
    "L2Ball": "certlab.threat",
    "SegmentUnion": "certlab.threat",
    "Box": "certlab.threat",
    "METHODS": "certlab.bounds",
    "Bounds": "certlab.bounds",
    "margins": "certlab.bounds",
    "certify": "certlab.bounds",
    "certified_radius": "certlab.verify.radius",
    "average_certified_radius": "certlab.verify.radius",
    "evaluate": "certlab.evaluation",
    "verify_complete": "certlab.verify",
    "Result": "certlab.verify",
    "load_onnx": "certlab.interchange",
}
_SUBMODULES = ("nn", "bounds", "attacks", "threat", "errors", "verify", "evaluation", "interchange", "data", "models",
               "train", "experiments", "runtime")
__all__ = sorted(_EXPORTS) + ["nn", "bounds", "attacks"]  # what `from certlab import *` gave before


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f"{__name__}.{name}")  # certlab.bounds is also callable: bounds(model, ...)
    else:
        raise AttributeError(f"module 'certlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
