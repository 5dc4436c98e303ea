"""Reading a run directory back: ``load_run`` (model + config, no code needed) and ``evaluate_run`` (→ eval.json)."""

from __future__ import annotations

import json
import os

from certlab.errors import CertlabError, CheckpointError
from certlab.train import checkpoint as ckpt
from certlab.train.config import TrainConfig, atomic_write_text
from certlab.train.setup import build_model, load_data, resolve_device
from certlab.train.threats import ThreatMaker


def _ckpt_path(run_dir, which):
    if which not in ("best", "last"):
        raise CertlabError(f"which must be 'best' or 'last', got {which!r}")
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CertlabError(f"run directory not found: {run_dir}")
    p = os.path.join(run_dir, f"{which}.pt")
    if not os.path.exists(p):
        raise CheckpointError(f"{run_dir} holds no {which}.pt checkpoint (not a certlab run, or not trained yet)")
    return p


def load_checkpoint_model(state: dict, device="cpu", path=None):
    """(model in eval mode, TrainConfig) from a loaded checkpoint dict (read from ``path``, named in errors)."""
    where = f"checkpoint {path}" if path else "checkpoint"
    try:
        cfg = TrainConfig.from_dict(state["config"])
        model = build_model(state["arch"], dict(state["model_params"]), state["dataset"], bool(state.get("normalize", True)))
        model.load_state_dict(state["model"])
    except CertlabError as e:
        raise CheckpointError(f"{where} is incompatible with this certlab: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{where} is incompatible with this certlab: it lacks the entry {e}") from None
    except RuntimeError:  # load_state_dict: torch's text lists every key over many lines
        raise CheckpointError(f"{where} is incompatible with this certlab: its weights do not fit the model it "
                              "describes (missing, unexpected or differently shaped parameters)") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} is incompatible with this certlab: it holds an unusable model description "
                              f"({type(e).__name__})") from None
    return model.to(device).eval(), cfg


def load_run(run_dir, which: str = "last", device="cpu"):
    """(model in eval mode, TrainConfig) of the run in ``run_dir``; corrupt/foreign checkpoint → CheckpointError.
    ``which``: "last" (the final epoch) or "best" (selected on validation samples — the first ``val_n`` test samples
    unless the run held out ``val_split`` training samples — so its test numbers are then optimistic)."""
    p = _ckpt_path(run_dir, which)
    return load_checkpoint_model(ckpt.load(p), device, p)


def evaluate_run(run_dir, norm=None, eps=None, certify=None, attacks=None, n=None, acr=None, which: str = "last",
                 batch_size: int = 256, device=None, progress: bool = False, write: bool = True,
                 output=None, restarts=None) -> dict:
    """Evaluate the run's model (``which`` checkpoint) on its dataset's test split; defaults from its config.

    ``restarts``: random restarts of each attack (default: the run's ``eval_restarts``). Writes ``output`` (default
    RUN_DIR/eval.json) atomically unless ``write=False``, and returns its content."""
    from certlab.evaluation import evaluate

    p = _ckpt_path(run_dir, which)
    state = ckpt.load(p)
    model, cfg = load_checkpoint_model(state, path=p)
    dev = resolve_device(device or cfg.device)
    model.to(dev)
    norm = cfg.norm if norm is None else norm
    eps = cfg.final_eval_eps if eps is None else eps
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise CertlabError(f"eps must be a number, got {eps!r}") from None
    if not eps >= 0 or eps != eps or eps == float("inf"):
        raise CertlabError(f"eps must be a finite number >= 0, got {eps}")
    certify = cfg.eval_certify if certify is None else certify
    attacks = cfg.eval_attacks if attacks is None else attacks
    n = cfg.eval_n if n is None else n
    acr = cfg.eval_acr if acr is None else acr
    restarts = cfg.eval_restarts if restarts is None else restarts
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise CertlabError(f"restarts must be a positive integer, got {restarts!r}")
    _, test, info = load_data(cfg)
    maker = ThreatMaker(norm, info.name, info, cfg.k, cfg.seed, cfg.segment_dirs)
    res = evaluate(model, test, lambda x: maker(x, eps), certify=certify, attacks=attacks, batch_size=batch_size,
                   acr=acr, device=dev, n=n, progress=progress,
                   attack_opts={"restarts": restarts} if attacks else None)
    res.update({"run": os.path.abspath(os.fspath(run_dir)), "checkpoint": which, "epoch": int(state["epoch"]),
                "norm": norm, "eps": eps, "restarts": restarts, "model": cfg.model, "dataset": cfg.dataset,
                "objective": cfg.objective})
    if write:
        out = os.path.join(os.fspath(run_dir), "eval.json") if output is None else os.fspath(output)
        atomic_write_text(out, json.dumps(res, indent=2))
    return res
