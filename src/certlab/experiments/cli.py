"""``certlab sweep FILE --out DIR --jobs N [--only NAMES] [--launcher local|ray] [--address A] [--dry-run]`` and
``certlab report DIR [--out OUT]``."""

from __future__ import annotations

import os

from certlab.errors import CertlabError


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run every unfinished cell of an experiment file (resumable)",
                              description="Expand an experiment YAML (base config + grid) into cells, run the "
                                          "cells not finished yet, record config and metrics in DIR/results.sqlite.")
    p.add_argument("file", help="experiment YAML file (see experiments/ and docs/experiments.md)")
    p.add_argument("--out", default=None, help="sweep directory (default: results/<file name without .yaml>)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="cells run at once (default 1)")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local worker processes (default) or a Ray cluster (needs the optional 'ray' package)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. ray://host:10001 or 'auto')")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default cores // jobs)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help="run only these documents of a multi-document file (by their 'name:'; default all)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status; run nothing")
    p.add_argument("--report", action="store_true", help="write the report when the sweep ends")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=_sweep)

    r = subparsers.add_parser("report", help="Markdown + HTML report with tables and figures from a sweep database",
                              description="Read DIR/results.sqlite (only) and write report.md, report.html and "
                                          "PNG figures.")
    r.add_argument("dir", help="sweep directory holding results.sqlite")
    r.add_argument("--out", default=None, help="report directory (default: DIR/report)")
    r.set_defaults(func=_report)


def _sweep(args) -> int:
    from certlab.experiments import grid, runner

    exps = _select(grid.load_all(args.file), args.only, args.file)
    out = args.out or os.path.join("results", os.path.splitext(os.path.basename(args.file))[0])
    if args.address and args.launcher != "ray":
        raise CertlabError("--address is only used with --launcher ray")
    if args.dry_run:
        rows = runner.plan(exps, out)
        for e in exps:
            if grid.uses_train_config(e):
                grid.validate_configs([c for name, c, _ in rows if name == e.name])
            print(f"experiment {e.name}: {sum(r[0] == e.name for r in rows)} cells"
                  + (f"  (budget: {e.budget})" if e.budget else ""))
        print(f"results -> {out}")
        print(runner.dump_plan(rows))
        return 0
    summary = runner.run_sweep(exps, out, jobs=args.jobs, launcher=args.launcher, address=args.address,
                               progress=not args.quiet, threads=args.threads)
    if args.report:
        from certlab.experiments.report import write_report
        print(f"report: {write_report(out)}")
    return 0 if summary["failed"] == 0 else 1


def _select(exps, only, path):
    """The documents of ``path`` named in ``only`` (comma-separated), in file order; all when only is None."""
    if only is None:
        return exps
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    names = [e.name for e in exps]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        raise CertlabError(f"--only {only!r}: {path} has no document named {', '.join(unknown) or '(empty)'}; "
                           f"its documents are: {', '.join(names)}")
    return [e for e in exps if e.name in wanted]


def _report(args) -> int:
    from certlab.experiments.report import write_report

    path = write_report(args.dir, args.out)
    print(path)
    return 0
