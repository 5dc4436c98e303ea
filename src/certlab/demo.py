"""``certlab demo`` (what ``make demo`` runs): the main job on built-in data, end to end.

1. IBP-certified vs PGD-adversarial vs standard training on ``digits`` (scikit-learn's 8x8 digits, shipped with the
   package) and on ``spheres``: the side-by-side table of standard / robust / certified error, kept in
   ``OUT/compare.json`` (a rerun with the same recipes reuses it; delete it to train again);
2. study 1 (a)-(c) of De Bartolomeis et al. in reduced form on concentric spheres (``experiments/demo_spheres.yaml``):
   a resumable sweep into ``OUT`` and a Markdown/HTML report with figures, whose path is printed. The report
   starts with part 1's tables.
"""

from __future__ import annotations

import json
import os
import time

COMPARE_FILE = "compare.json"  # read by certlab.experiments.report (its COMPARE_FILE) into the demo report
DATASETS = ("digits", "spheres")
RECIPES = ("standard", "pgd", "ibp")


def register(sub):
    p = sub.add_parser("demo", help="train and compare models on built-in data, run the reduced study 1, write a report",
                       description=__doc__.replace("``", ""))
    p.add_argument("--out", default="results/demo", help="sweep/report folder (default results/demo; resumable)")
    p.add_argument("--jobs", type=int, default=None, help="parallel cells for the study (default: up to 2)")
    p.add_argument("--skip-compare", action="store_true", help="only run the study")
    p.add_argument("--skip-study", action="store_true", help="only run the side-by-side comparison")
    p.set_defaults(func=run)


def _settings(dataset) -> dict:
    """What part 1 trains on ``dataset``: a stored comparison is reused only when these are unchanged."""
    from certlab.train.compare import PRESETS
    from certlab.train.compare import RECIPES as ALL

    return {"dataset": dataset, "preset": PRESETS.get(dataset), "recipes": {r: ALL[r] for r in RECIPES}}


def read_compare(out_dir) -> dict:
    """{dataset: {"settings", "rows"}} from ``out_dir/compare.json`` ({} when absent or unreadable)."""
    try:
        with open(os.path.join(out_dir, COMPARE_FILE), encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_compare(out_dir, data) -> None:
    from certlab.fileio import write_text

    write_text(os.path.join(out_dir, COMPARE_FILE), json.dumps(data, indent=2))


def compare(out_dir, datasets=DATASETS, progress: bool = True, **overrides) -> dict:
    """Part 1: train and evaluate each recipe on each dataset (or reuse ``out_dir/compare.json``), print the tables
    and store them there; returns {dataset: rows}. ``overrides`` go into every TrainConfig (tests: epochs=1)."""
    from certlab.evaluation import format_table
    from certlab.progress import heartbeat
    from certlab.train import quick_compare

    stored = read_compare(out_dir)
    out = {}
    for ds in datasets:
        settings = json.loads(json.dumps({**_settings(ds), "overrides": overrides}))
        old = stored.get(ds)
        if isinstance(old, dict) and old.get("settings") == settings and old.get("rows"):
            rows, note = old["rows"], f" (stored in {os.path.join(out_dir, COMPARE_FILE)}; delete it to retrain)"
        else:
            rows = []
            for name in RECIPES:  # one at a time, to say which is running
                if progress:
                    print(f"  {ds}: training and evaluating {name} ...", flush=True)
                with heartbeat(f"  {ds} {name}", progress):  # a line every 10 s, a last one when done
                    rows += quick_compare(ds, recipes=(name,), print_table=False, progress=False, **overrides)
            rows = [{k: v for k, v in r.items() if k != "run"} for r in rows]  # the temporary run folder is gone
            stored[ds] = {"settings": settings, "rows": rows}
            _write_compare(out_dir, stored)
            note = ""
        out[ds] = rows
        if progress:
            norm = rows[0].get("norm", "")
            print(format_table(rows, title=f"{ds}: test errors (eps={rows[0]['eps']:g}, {norm}){note}"), flush=True)
    return out


def run(args) -> int:
    from certlab.experiments import run_demo

    t0 = time.time()
    if not args.skip_compare:
        print("== 1. standard vs PGD vs IBP training on built-in data ==", flush=True)
        compare(args.out)
    if not args.skip_study:
        print("\n== 2. study 1 (De Bartolomeis et al.) on spheres, reduced: certified vs adversarial training ==",
              flush=True)
        report = run_demo(args.out, jobs=args.jobs)
        print(f"\nreport: {os.path.abspath(report)}")
        html = os.path.splitext(report)[0] + ".html"
        if os.path.exists(html):
            print(f"        {os.path.abspath(html)}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0
