"""The ``certlab`` command. Each sub-command lives in the module that owns its work and exposes
``register(subparsers)``; this file only wires them together (imports are lazy so ``--help`` is fast)."""

from __future__ import annotations

import argparse
import importlib
import sys

import certlab

# sub-command name -> module providing register(subparsers) that adds exactly that sub-command
COMMANDS = {
    "demo": "certlab.demo",
    "train": "certlab.train.cli",
    "evaluate": "certlab.train.cli",
    "certify": "certlab.verify.cli",
    "diagnose": "certlab.verify.cli",
    "export": "certlab.verify.cli",
    "verify": "certlab.verify.vnncomp",
    "sweep": "certlab.experiments.cli",
    "report": "certlab.experiments.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certlab", description=certlab.__doc__)
    parser.add_argument("--version", action="version", version=f"certlab {certlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done = set()
    for name, module in COMMANDS.items():
        if module in done:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name and e.name.startswith("certlab"):
                continue
            raise
        mod.register(sub)
        done.add(module)
    return parser


def main(argv=None) -> int:
    from certlab import runtime

    runtime.tune()  # before the sub-commands import torch (certlab.runtime explains; CERTLAB_TUNE_MEMORY=0 skips it)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except certlab.CertlabError as e:
        print(f"certlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
