"""Studies: declarative sweeps (YAML base config + grid), a SQLite results store, resumable parallel runs and
reports with figures. See docs/experiments.md.

    exp = certlab.experiments.load("experiments/study1_spheres_k.yaml")
    certlab.experiments.run_sweep(exp, "results/study1_k", jobs=2)
    certlab.experiments.write_report("results/study1_k")          # -> results/study1_k/report/report.md
    certlab.experiments.run_demo("results/demo")                   # study 1(a)-(c) reduced, -> report path
"""

from __future__ import annotations

import os

from certlab.experiments.grid import Cell, Experiment, cell_id, expand, from_dict, load, load_all  # noqa: F401
from certlab.experiments.report import write_report  # noqa: F401
from certlab.experiments.runner import plan, run_sweep  # noqa: F401
from certlab.experiments.store import Store  # noqa: F401

__all__ = ["Cell", "Experiment", "cell_id", "expand", "from_dict", "load", "load_all", "write_report", "plan", "run_sweep",
           "Store", "run_demo", "experiment_path", "DEMO_FILE"]

DEMO_FILE = "demo_spheres.yaml"


def experiment_path(name: str) -> str:
    """Path of a shipped experiment file (``experiments/<name>`` in the source tree), e.g. ``demo_spheres.yaml``."""
    from certlab.errors import CertlabError

    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "..", "..", ".."), os.getcwd()):
        path = os.path.normpath(os.path.join(root, "experiments", name))
        if os.path.isfile(path):
            return path
    raise CertlabError(f"experiment file experiments/{name} not found (run from the certlab source tree)")


def run_demo(out_dir="results/demo", jobs: int | None = None, progress: bool = True) -> str:
    """Study 1 (a)-(c) on spheres in reduced form (``experiments/demo_spheres.yaml``: a few minutes on 2 cores):
    run the sweep into ``out_dir`` (resumable), write the report and return the path of ``report.md``."""
    if jobs is None:
        jobs = max(1, min(2, os.cpu_count() or 1))
    run_sweep(experiment_path(DEMO_FILE), out_dir, jobs=jobs, progress=progress)
    return write_report(out_dir)
