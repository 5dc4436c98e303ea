"""``certlab demo`` (what ``make demo`` runs): the main job on built-in data, end to end.

1. IBP-certified vs PGD-adversarial vs standard training on ``digits`` (scikit-learn's 8x8 digits, shipped with the
   package) and on ``spheres``: the side-by-side table of standard / robust / certified error;
2. study 1 (a)-(c) of De Bartolomeis et al. in reduced form on concentric spheres (``experiments/demo_spheres.yaml``):
   a resumable sweep into ``results/demo`` and a Markdown/HTML report with figures, whose path is printed.
"""

from __future__ import annotations

import os
import time


def register(sub):
    p = sub.add_parser("demo", help="train and compare models on built-in data, run the reduced study 1, write a report",
                       description=__doc__)
    p.add_argument("--out", default="results/demo", help="sweep/report folder (default results/demo; resumable)")
    p.add_argument("--jobs", type=int, default=None, help="parallel cells for the study (default: up to 2)")
    p.add_argument("--skip-compare", action="store_true", help="only run the study")
    p.add_argument("--skip-study", action="store_true", help="only run the side-by-side comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    from certlab.experiments import run_demo
    from certlab.train import quick_compare

    t0 = time.time()
    if not args.skip_compare:
        print("== 1. standard vs PGD vs IBP training on built-in data ==", flush=True)
        for ds in ("digits", "spheres"):
            quick_compare(ds, recipes=("standard", "pgd", "ibp"), progress=False)
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
