"""``certlab train`` and ``certlab evaluate``.

Every :class:`TrainConfig` field is an option (``--batch-size`` for ``batch_size``; lists comma-separated; dicts as
``key=value,key=value`` or JSON). Precedence: built-in defaults < ``--config FILE.yaml`` < command-line options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from certlab.errors import CertlabError
from certlab.train.config import TrainConfig, read_yaml
from certlab.train.schedules import AUTO

HELP = {
    "dataset": "dataset name (spheres, linsep, mnist, fashion-mnist, cifar10, svhn, digits)",
    "data": "dataset parameters, e.g. d=10,n=500,margin=0.3",
    "root": "folder holding the dataset files (none: $CERTLAB_DATA, else a user cache folder)",
    "model": "model zoo name (mlp, fc5, conv, convplus, wong-small, ...)",
    "model_params": "model parameters, e.g. hidden=[200,100]",
    "normalize": "put the dataset's mean/std normalisation into the model as its first layer",
    "objective": "standard | pgd | trades | certified | adaptive | sabr | taps | staps | mtl-ibp | exp-ibp | cc-ibp "
                 "(see the list below)",
    "relaxation": "bound method of the certified part of certified, adaptive and the six objectives below (ibp, hbox, "
                  "deepz, fastlin, crown, crown-ibp, alpha-crown; loose Box box-c:OMEGA, box-dc:OMEGA:F)",
    "sabr_lambda": "SABR/STAPS: the small set's radius as a fraction of eps, in (0, 1]; 1 = certified training",
    "taps_head": "TAPS/STAPS: ReLU layers in the PGD-searched head (0: only the final affine layers = IBP)",
    "taps_grad_scale": "TAPS/STAPS: gradient scale w of the TAPS factor",
    "taps_threshold": "TAPS/STAPS: threshold c of the gradient connector, in (0, 1]",
    "taps_ibp_mult": "TAPS/STAPS: multiply the TAPS loss by the certified loss",
    "taps_targets": "TAPS/STAPS: classes searched per sample, the k with the lowest certified margins (the others "
                    "keep their bounds; cuts the search's cost by k/(K-1)); 0: all K-1 (the paper's)",
    "cert_alpha": "MTL-/EXP-/CC-IBP: weight alpha of the certified part, in [0, 1]",
    "norm": "threat set: linf or l2 ball, or segments (a union of k segments per sample)",
    "eps": "training radius: the value the eps schedule ramps up to",
    "k": "segments: number of segments per sample",
    "segment_dirs": "segments: k seeded random orthonormal directions, nested in k (random, the paper's B_eps,k) "
                    "or the dataset's signal directions (signal: radial + k-1 orthogonal on spheres)",
    "epochs": "epochs to train (with --resume, a larger value extends the run)",
    "batch_size": "samples per optimiser step",
    "lr": "learning rate (the peak with lr_schedule onecycle)",
    "optimizer": "adam | sgd",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay of the optimiser",
    "lr_schedule": "none | step (x lr_gamma every lr_milestones[0] epochs) | multistep (x lr_gamma at each "
                   "milestone) | onecycle",
    "lr_milestones": "epochs of the step / multistep LR schedules, e.g. 50,75",
    "lr_gamma": "LR factor applied at each milestone",
    "eps_schedule": "shape of the eps ramp: linear | smoothed (slow start, Shi et al. 2021) (none: auto, smoothed "
                    "with the auto ramp, else linear)",
    "eps_start_epoch": "epoch at which the eps ramp starts; eps = 0 (clean training) before it (none: auto, 5% of "
                       "the epochs for the certified-type objectives certified, adaptive, sabr, taps, staps, mtl-ibp, "
                       "exp-ibp and cc-ibp when eps_ramp_epochs is auto too, else 0)",
    "eps_ramp_epochs": "epochs over which eps, kappa and beta go from their start to their end value (none: auto, "
                       "50% of the epochs for certified-type objectives when eps_start_epoch is auto too, else 0 = "
                       "full eps at once)",
    "kappa_start": "weight of the clean loss in kappa*clean + (1-kappa)*robust loss, at the start of the ramp (none: "
                   "auto, 1 with the auto ramp, 0 for adaptive and otherwise)",
    "kappa_end": "weight of the clean loss at the end of the ramp (none: auto, 0; adaptive: kappa_start, a "
                 "constant weight as in ACERT)",
    "beta_start": "crown-ibp: weight of the CROWN back-substitution (vs plain IBP) at the start of the ramp",
    "beta_end": "crown-ibp: weight of the CROWN back-substitution at the end of the ramp",
    "attack": "attack of adversarial (pgd/trades) training, e.g. pgd, apgd-ce; segment for segment sets",
    "attack_steps": "steps of the training attack",
    "attack_restarts": "random restarts of the training attack",
    "attack_step": "pgd step size as a multiple of eps (none: 2.5/attack_steps)",
    "trades_beta": "trades: weight of the KL term",
    "fast_ibp_reg": "add the Fast-IBP warm-up regularisers (Shi et al. 2021) while eps ramps up",
    "reg_weight": "weight of the Fast-IBP regularisers",
    "ibp_init": "Fast-IBP weight initialisation (Shi et al. 2021); auto: on for sabr, taps, staps, mtl-ibp, exp-ibp, "
                "cc-ibp, off otherwise",
    "grad_clip": "clip the gradient norm to this value (none: no clipping)",
    "seed": "seed of the data order, initialisation, attacks and generated datasets",
    "device": "cpu | cuda",
    "eval_eps": "radius of per-epoch validation and of the final evaluation (none: eps)",
    "eval_certify": "relaxations of the final evaluation, e.g. ibp,crown",
    "eval_attacks": "attacks of the final evaluation, e.g. apgd-ce,apgd-t",
    "eval_restarts": "random restarts of each final-evaluation attack",
    "eval_n": "final evaluation on the first N test samples only (none: all)",
    "eval_acr": "the final evaluation also computes the average certified radius (slow)",
    "val_n": "test samples for per-epoch validation and the choice of best.pt when val_split is 0",
    "val_split": "training samples held out (not trained on) for per-epoch validation and best.pt; 0: val_n test samples",
}

RESUME_HELP = ("continue the run in --out from its last completed epoch, with the configuration stored in the run "
               "(no other option needed). Options given with --resume must agree with the stored run, except "
               "--epochs (a larger value extends the run, not with lr_schedule onecycle), --device, --root and the "
               "final-evaluation options --eval-certify, --eval-attacks, --eval-restarts, --eval-n, --eval-acr. "
               "Without a checkpoint in --out the run starts from scratch")


OBJECTIVE_HELP = """objectives (--objective; the certified part uses --relaxation, IBP by default; see docs/training.md):
  standard   cross-entropy on clean inputs
  pgd        adversarial training on --attack points (Madry et al. 2018)
  trades     clean CE + beta * KL to the adversarial prediction (Zhang et al. 2019)
  certified  CE of the worst-case logits from the relaxation's margin bounds over the eps-set
  adaptive   certified loss at each sample's own certified radius (ACERT)
  sabr       certified loss over a small set (radius sabr_lambda*eps) around the attack point (Mueller et al. 2023)
  taps       IBP for the first layers, PGD in their box for the last taps_head ReLU layers (Mao et al. 2023)
  staps      taps over SABR's small set (Mao et al. 2023)
  mtl-ibp    alpha * certified loss + (1 - alpha) * adversarial loss (De Palma et al. 2024)
  exp-ibp    certified loss^alpha * adversarial loss^(1 - alpha) (De Palma et al. 2024)
  cc-ibp     CE of alpha * margin bounds + (1 - alpha) * adversarial margins (De Palma et al. 2024)
"""


def _scalar(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_dict(text: str) -> dict:
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise argparse.ArgumentTypeError("expected a mapping")
        return d
    out = {}
    depth, cur, parts = 0, "", []
    for ch in text:  # split on commas outside brackets
        depth += ch in "[(" and 1 or 0
        depth -= ch in "])" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for p in parts:
        if "=" not in p:
            raise argparse.ArgumentTypeError(f"expected key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = _scalar(v.strip())
    return out


def _parse_list(text: str) -> list:
    return [_scalar(s.strip()) for s in text.split(",") if s.strip()]


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(parse):
    def f(text):
        return None if text.strip().lower() in ("none", "null", "") else parse(text)
    return f


def _converter(f: dataclasses.Field):
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    args = typing.get_args(t)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), t) if args else t
    base = typing.get_origin(base) or base
    parse = {bool: _parse_bool, int: int, float: float, dict: _parse_dict, list: _parse_list, str: str}.get(base, str)
    if f.name in AUTO:
        return _auto(parse)
    return _optional(parse) if optional else parse


def _auto(parse):
    def f(text):
        return None if text.strip().lower() in ("auto", "none", "null", "") else parse(text)
    return f


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) if v else "empty"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items()) if v else "empty"
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (standard, adversarial or certified)",
                              description="Train a model; every option can also come from --config FILE.yaml.",
                              epilog=OBJECTIVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with option: value defaults (command-line options override it)")
    p.add_argument("--out", required=True, help="run directory (config.yaml, metrics.jsonl, last.pt, best.pt, ...)")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (by default a bar on a terminal, else a log line every 10 s, and one "
                        "line per epoch, on stderr)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = HELP.get(f.name, f.name.replace("_", " "))
        if "none:" not in text:  # a None default is explained in the text itself
            text += f" (default: {_show(default)})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_converter(f), default=argparse.SUPPRESS,
                       metavar=f.name.upper(), help=text.replace("%", "%%"))
    p.set_defaults(func=_train_cmd)

    e = subparsers.add_parser("evaluate", help="evaluate a trained run: clean / robust / certified error",
                              description="Evaluate RUN_DIR's model on its test set; writes RUN_DIR/eval.json.")
    e.add_argument("run_dir", help="run directory written by certlab train")
    e.add_argument("--norm", choices=("linf", "l2", "segments"), help="threat set (default: the run's norm)")
    e.add_argument("--eps", type=float, help="radius (default: the run's eval_eps, else its eps)")
    e.add_argument("--certify", type=lambda s: [m for m in s.split(",") if m], help="e.g. ibp,crown ('none' for no certification)")
    e.add_argument("--attack", dest="attacks", type=lambda s: [m for m in s.split(",") if m],
                   help="e.g. apgd-ce,apgd-t ('none' for no attack)")
    e.add_argument("--restarts", type=int, help="random restarts of each attack (default: the run's eval_restarts, 1)")
    e.add_argument("--n", type=int, help="first N test samples only")
    e.add_argument("--acr", action="store_true", default=None, help="also compute the average certified radius")
    e.add_argument("--which", choices=("best", "last"), default="last",
                   help="checkpoint: last (default) or best (see certlab certify --help)")
    e.add_argument("--batch-size", type=int, default=256, help="samples per batch (default 256)")
    e.add_argument("--device", choices=("cpu", "cuda"), help="default: the run's device")
    e.add_argument("--output", "-o", help="where to write the JSON result (default: RUN_DIR/eval.json)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress output (by default a bar on a terminal, else a log line every 10 s)")
    e.set_defaults(func=_evaluate_cmd)


def config_from_args(args) -> TrainConfig:
    """Defaults < --config FILE < options; with --resume and a checkpoint in --out: the run's stored config, with
    the given options (and --config file) checked against it (see RESUME_HELP)."""
    d = read_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d.update({k: v for k, v in vars(args).items() if k in names})
    if getattr(args, "resume", False):
        stored = stored_config(args.out)
        if stored is not None:
            return resume_config(stored, d, args.out)
    return TrainConfig.from_dict(d)


def stored_config(run_dir) -> dict | None:
    """The config of the run in ``run_dir`` (from its last.pt), or None when it holds no checkpoint yet."""
    from certlab.train import checkpoint as ckpt

    last = os.path.join(os.fspath(run_dir), "last.pt")
    return dict(ckpt.load(last)["config"]) if os.path.exists(last) else None


def resume_config(stored: dict, given: dict, run_dir) -> TrainConfig:
    """The stored config updated by ``given``; a given value that differs from the stored one in a field a resumed
    run may not change raises one CertlabError naming every such option."""
    from certlab.train.loop import RESUME_MUTABLE

    base = TrainConfig.from_dict(stored)
    merged = TrainConfig.from_dict({**base.to_dict(), **given})
    old, new = base.to_dict(), merged.to_dict()
    bad = [k for k in given if k not in RESUME_MUTABLE and new[k] != old[k]]
    if bad:
        what = "; ".join(f"--{k.replace('_', '-')} {_show(new[k])} (stored: {_show(old[k])})" for k in bad)
        raise CertlabError(f"--resume continues {run_dir} with its stored configuration, which these options "
                           f"contradict: {what}; drop them, or train into a new --out")
    return merged


def _train_cmd(args) -> int:
    from certlab.evaluation import format_table
    from certlab.train.loop import train
    from certlab.train.objectives import CERTIFIED

    cfg = config_from_args(args)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, evaluate=not args.no_eval)
    last = summary.get("last") or {}
    print(f"trained {cfg.model} on {cfg.dataset} ({cfg.objective}"
          f"{', ' + cfg.relaxation if cfg.objective in CERTIFIED else ''}) for {cfg.epochs} epochs "
          f"in {summary['train_time_s']:.1f}s; final train loss {last.get('loss', float('nan')):.4f}; run: {args.out}")
    if "eval" in summary:
        print(format_table([{"name": args.out, **summary["eval"]}]))
    return 0


def _evaluate_cmd(args) -> int:
    from certlab.evaluation import format_table
    from certlab.train.run import evaluate_run

    if args.n is not None and args.n < 1:
        raise CertlabError(f"--n must be a positive integer, got {args.n}")
    if args.eps is not None and not args.eps >= 0:
        raise CertlabError(f"--eps must be >= 0, got {args.eps}")
    if args.restarts is not None and args.restarts < 1:
        raise CertlabError(f"--restarts must be a positive integer, got {args.restarts}")
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise CertlabError(f"--output: directory {parent} does not exist")
    attacks = args.attacks
    if attacks is not None and [a.lower() for a in attacks] == ["none"]:
        attacks = []
    certify = args.certify
    if certify is not None and [m.lower() for m in certify] == ["none"]:
        certify = []
    res = evaluate_run(args.run_dir, norm=args.norm, eps=args.eps, certify=certify, attacks=attacks, n=args.n,
                       acr=args.acr, which=args.which, batch_size=args.batch_size, device=args.device,
                       progress=not args.no_progress, output=args.output, restarts=args.restarts)
    print(format_table([{"name": args.run_dir, **res}]))
    out = args.output or os.path.join(args.run_dir, "eval.json")
    print(f"wrote {out} ({res['time_s']:.1f}s)", file=sys.stderr)
    return 0
