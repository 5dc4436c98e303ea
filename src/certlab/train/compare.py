"""``quick_compare``: train a few small models on one dataset (e.g. standard vs PGD vs IBP) and evaluate them side by
side — the building block of ``certlab demo``."""

from __future__ import annotations

import os
import tempfile

from certlab.evaluation import format_table
from certlab.train.config import TrainConfig
from certlab.train.loop import train

# small, fast recipes (about 10-30 s of CPU time per model)
PRESETS = {
    "spheres": {"dataset": "spheres", "data": {"d": 10, "n": 2000, "margin": 0.5}, "model": "mlp",
                "model_params": {"hidden": [100]}, "norm": "l2", "eps": 0.15, "epochs": 15, "batch_size": 64,
                "lr": 5e-3},
    "digits": {"dataset": "digits", "model": "mlp", "model_params": {"hidden": [100]}, "norm": "linf", "eps": 0.1,
               "epochs": 15, "batch_size": 64, "lr": 2e-3},
}
RECIPES = {
    "standard": {"objective": "standard"},
    "pgd": {"objective": "pgd", "attack": "pgd", "attack_steps": 10},
    "ibp": {"objective": "certified", "relaxation": "ibp", "eps_ramp_epochs": 5, "kappa_start": 1.0,
            "kappa_end": 0.0},
    "crown-ibp": {"objective": "certified", "relaxation": "crown-ibp", "eps_ramp_epochs": 5, "kappa_start": 1.0,
                  "kappa_end": 0.0, "beta_start": 1.0, "beta_end": 0.0},
}


def quick_compare(dataset: str = "spheres", recipes=("standard", "pgd", "ibp"), out_root=None, progress=False,
                  print_table: bool = True, **overrides) -> list[dict]:
    """Train each recipe on ``dataset`` (a key of PRESETS, or any dataset with ``overrides``) and evaluate it.

    Returns one dict per recipe (``name`` + the keys of ``certlab.evaluate``); prints the side-by-side table of
    clean / robust / certified error unless ``print_table=False``. ``overrides`` go into every TrainConfig
    (e.g. ``epochs=5``). Runs are written under ``out_root`` (a temporary folder when None)."""
    base = dict(PRESETS.get(dataset, {"dataset": dataset}))
    base.update({"eval_certify": ["ibp", "crown"], "eval_attacks": ["apgd-ce"] if base.get("norm") != "segments"
                 else ["segment"], "val_n": 200})
    base.update(overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="certlab-compare-") as tmp:
        root = tmp if out_root is None else os.fspath(out_root)
        for name in recipes:
            if name not in RECIPES:
                from certlab.errors import CertlabError

                raise CertlabError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
            cfg = TrainConfig.from_dict({**base, **RECIPES[name], **overrides})
            summary = train(cfg, os.path.join(root, f"{dataset}-{name}"), progress=progress)
            rows.append({"name": name, **summary["eval"]})
    if print_table:
        print(format_table(rows, title=f"{dataset}: test errors (eps={rows[0]['eps']:g}, {base.get('norm', 'linf')})"))
    return rows
