"""The one training loop: ``train(config, out_dir, resume=False, progress=True) -> summary``.

Run directory: ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per completed epoch),
``last.pt`` / ``best.pt`` (atomic checkpoints), ``eval.json`` (final evaluation), ``summary.json``.

Reproducibility: all seeds come from ``cfg.seed``; batches are drawn from a private ``torch.Generator`` whose state
(with the torch / numpy / python RNG states, optimiser and LR-scheduler states and the metrics history) is saved
at the end of every epoch, so a run killed at any moment and resumed with ``resume=True`` continues from the last
completed epoch and ends with the same weights as an uninterrupted run (on the same device and thread count).

Schedules: the config's auto schedule fields are resolved once, at the start (:func:`resolve_for_run`; a resumed
run keeps the values stored in it), the recipe is printed as one line and kept in ``summary.json`` (``schedule``).
A run whose training accuracy is still at chance at the end of an epoch after the ε ramp prints one warning naming
the likely cause and the options to change, also kept in ``metrics.jsonl`` (``warning``) and ``summary.json``.

Model selection: after each epoch the model is validated (clean error for ``standard``, PGD-10 robust error for
``pgd``/``trades``, certified error by the training relaxation otherwise, at the evaluation ε) on ``val_split``
training samples held out from training when ``val_split`` > 0, else on the first ``val_n`` test samples;
``best.pt`` keeps the best epoch once the ε ramp is complete. Selected on test samples, ``best.pt``'s test numbers
are optimistic, so the final evaluation (``eval.json``) and the commands default to the last epoch's model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch

from certlab import attacks as atk
from certlab import models
from certlab.bounds import certify as _certify
from certlab.bounds.engine import relu_bounds
from certlab.errors import CertlabError
from certlab.progress import bar as progress_bar
from certlab.progress import clock
from certlab.train import checkpoint as ckpt
from certlab.train import schedules
from certlab.train.config import TrainConfig, atomic_write_text
from certlab.train.objectives import CERTIFIED, OBJECTIVES, StepContext
from certlab.train.setup import (build_model, dataset_record, load_data, load_optimizer_state, make_optimizer,
                                 make_scheduler, resolve_device, seed_everything)
from certlab.train.threats import ThreatMaker

# per-step costs summed over the epoch into its record: ACERT's radius search (wall seconds, batched bound
# evaluations, samples bounded); ``time_s`` is the whole epoch (training steps and validation)
EPOCH_SUMS = ("radius_time_s", "radius_evals", "radius_sample_evals")
FILES = {"config": "config.yaml", "metrics": "metrics.jsonl", "last": "last.pt", "best": "best.pt",
         "eval": "eval.json", "summary": "summary.json"}


def _as_config(config) -> TrainConfig:
    if isinstance(config, TrainConfig):
        config.validate()
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    raise CertlabError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")


def batches(perm: torch.Tensor, batch_size: int) -> list:
    """Chunks of ``perm``; a trailing chunk of one sample joins the previous one (BatchNorm needs ≥ 2)."""
    chunks = list(torch.split(perm, batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < 2:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def split_validation(cfg, train_set, test_set):
    """(training tensors x, y; validation tensors x, y; description). With ``val_split`` > 0 a seeded random subset of
    that many training samples is held out (the rest keep their order); else validation reads the first ``val_n``
    test samples."""
    N = len(train_set)
    if cfg.val_split:
        if cfg.val_split >= N:
            raise CertlabError(f"val_split={cfg.val_split} leaves no training samples ({N} in the training set)")
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed + 104729))
        held = torch.zeros(N, dtype=torch.bool)
        held[perm[:cfg.val_split]] = True
        return (train_set.x[~held], train_set.y[~held], train_set.x[held], train_set.y[held],
                f"{cfg.val_split} held-out training samples")
    n = min(cfg.val_n, len(test_set))
    return train_set.x, train_set.y, test_set.x[:n], test_set.y[:n], f"the first {n} test samples"


@torch.no_grad()
def _validate(model, cfg, val, maker, device):
    """(clean error, robust-or-certified error or None, unstable ReLUs per sample or None) on the validation samples
    ``val`` = (x, y). Unstable ReLUs: crossing neurons of the IBP pre-activation bounds at the evaluation ε
    (De Bartolomeis et al., Eq. 3), logged every epoch so studies can plot them over training."""
    x, y = val[0].to(device), val[1].to(device)
    n = x.shape[0]
    model.eval()
    eps = cfg.final_eval_eps
    wrong = torch.zeros(n, dtype=torch.bool, device=device)
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    unstable = 0.0
    for s in range(0, n, 500):
        xb, yb = x[s:s + 500], y[s:s + 500]
        wrong[s:s + 500] = model(xb).argmax(1) != yb
        if eps > 0:
            pre = relu_bounds(model, xb, maker(xb, eps), "ibp")
            unstable += sum(float(((lo < 0) & (up > 0)).flatten(1).sum(1).float().sum()) for lo, up in pre)
        if cfg.objective in CERTIFIED and eps > 0:  # over the whole ε-set, whatever set the objective propagated
            method = "crown" if cfg.relaxation == "alpha-crown" else cfg.relaxation
            bad[s:s + 500] = ~_certify(model, xb, yb, maker(xb, eps), method=method)
        elif cfg.objective in ("pgd", "trades") and eps > 0:
            with torch.enable_grad():
                bad[s:s + 500] = atk.robust_error(model, xb, yb, maker(xb, eps), attacks=("pgd",), steps=10)
    clean = float(wrong.float().mean())
    unstable = unstable / n if eps > 0 and n else None
    if cfg.objective == "standard" or eps == 0:
        return clean, None, unstable
    return clean, float((bad | wrong).float().mean()), unstable


def _check_out(out_dir, resume) -> bool:
    """Create ``out_dir`` if needed; True when this call created it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CertlabError(f"output path exists and is not a directory: {out_dir}")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    last = os.path.join(out_dir, FILES["last"])
    if not resume and (os.path.exists(last) or os.path.exists(os.path.join(out_dir, FILES["summary"]))):
        raise CertlabError(f"{out_dir} already holds a run; pass resume=True (--resume) or choose another output folder")
    return created


# config fields a resumed run may change: where it runs and reads its data, how long it trains (a longer run
# continues the same schedules; not with the one-cycle LR schedule, whose length is fixed) and what the final
# evaluation measures. Every other field shapes the training trajectory or the choice of best.pt.
RESUME_MUTABLE = ("device", "root", "epochs", "eval_certify", "eval_attacks", "eval_restarts", "eval_n", "eval_acr")


def _same_config(stored: dict, cfg: TrainConfig, epochs_done: int = 0):
    a = TrainConfig.from_dict(stored).resolved().to_dict()
    b = cfg.to_dict()
    diff = sorted(k for k in a if k not in RESUME_MUTABLE and a[k] != b[k])
    if diff:
        raise CertlabError(f"cannot resume: the config differs from the stored run in {', '.join(diff)} "
                           f"(a resumed run may change only {', '.join(RESUME_MUTABLE)})")
    if b["epochs"] != a["epochs"]:
        if b["epochs"] < epochs_done:
            raise CertlabError(f"cannot resume with epochs={b['epochs']}: the run has completed {epochs_done} epochs")
        if a["lr_schedule"] == "onecycle":
            raise CertlabError("cannot change epochs on resume with lr_schedule=onecycle (its length is fixed)")


def _remove_if_unused(out_dir):
    """After a failed run in a folder it created: remove what the run wrote before its first checkpoint (the config
    and an empty metrics file), and the folder once empty. A run with a checkpoint is kept (it can be resumed)."""
    if os.path.exists(os.path.join(out_dir, FILES["last"])):
        return
    for name in (FILES["config"], FILES["metrics"]):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p) and (name == FILES["config"] or os.path.getsize(p) == 0):
            os.remove(p)
    try:
        os.rmdir(out_dir)
    except OSError:  # something else is in it
        pass


def train(config, out_dir, resume: bool = False, progress: bool = True, evaluate: bool = True) -> dict:
    """Train a model as described by ``config`` (a :class:`TrainConfig` or a dict) into ``out_dir``.

    Returns the summary: the last epoch's metrics plus the final evaluation (``eval``) on the test set. A run that
    fails before its first checkpoint leaves no folder behind (when it created the folder)."""
    cfg = _as_config(config)
    out_dir = os.fspath(out_dir)
    created = _check_out(out_dir, resume)
    try:
        with contextlib.ExitStack() as bars:  # progress bars are closed however training ends
            return _train(cfg, out_dir, resume, progress, evaluate, bars)
    except BaseException:
        if created:
            _remove_if_unused(out_dir)
        raise


def resolve_for_run(cfg: TrainConfig, stored: dict | None = None) -> TrainConfig:
    """The config a run trains with: auto schedule fields take the stored run's values when resuming (so a resumed or
    extended run keeps the schedule its start resolved), else :func:`schedules.resolve`'s."""
    if stored is not None:
        old = TrainConfig.from_dict(stored).resolved()
        cfg = cfg.replace(**{n: getattr(old, n) for n in schedules.AUTO if getattr(cfg, n) is None})
    return cfg.resolved()


def chance_level(y) -> float:
    """Accuracy of always predicting the most frequent training label (1/K for K balanced classes)."""
    counts = torch.bincount(y.flatten().long().cpu())
    return float(counts.max()) / max(int(counts.sum()), 1)


def at_chance(train_acc: float, chance: float) -> bool:
    """Training accuracy no better than chance: at most chance + 5 % of the room above it (0.145 for 10 balanced
    classes, 0.525 for 2)."""
    return train_acc <= chance + 0.05 * (1.0 - chance)


def chance_warning(cfg: TrainConfig, record: dict, chance: float, K: int) -> str:
    """The one-line warning for a run still at chance after its ε ramp: the likely cause and the flags to change."""
    head = (f"warning: training accuracy {record['train_acc']:.3f} is at chance ({chance:.3f}, {K} classes) at the "
            f"end of epoch {record['epoch']}")
    if cfg.objective == "standard" or cfg.eps == 0:
        return f"{head}; the learning rate is likely wrong for this model: change --lr, or train longer (--epochs)"
    kappa = ", a clean start --kappa-start 1" if cfg.objective in schedules.RAMPED else ""
    return (f"{head}, after the eps ramp: eps {cfg.eps:g} was likely reached too fast or is too large for this "
            f"model, or the learning rate is wrong; try a longer warm-up and ramp (--eps-start-epoch, "
            f"--eps-ramp-epochs{kappa}), another --lr, or more --epochs")


def _train(cfg, out_dir, resume, progress, evaluate, bars) -> dict:
    path = {k: os.path.join(out_dir, v) for k, v in FILES.items()}
    state = ckpt.load(path["last"]) if resume and os.path.exists(path["last"]) else None
    asked = cfg
    cfg = resolve_for_run(cfg, state["config"] if state is not None else None)
    if state is not None:
        _same_config(state["config"], cfg, int(state["epoch"]))

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    train_set, test_set, info = load_data(cfg)
    x_train, y_train, x_val, y_val, val_desc = split_validation(cfg, train_set, test_set)
    ds = dataset_record(cfg, info)
    model = build_model(cfg.model, cfg.model_params, ds, cfg.normalize).to(device)
    if cfg.ibp_init:
        models.init_ibp_(model)
    opt = make_optimizer(cfg, model.parameters())
    N = x_train.shape[0]
    steps = len(batches(torch.arange(N), cfg.batch_size))
    sched, per_batch = make_scheduler(cfg, opt, steps)
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    start, best, global_step, history = 0, math.inf, 0, []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            load_optimizer_state(opt, state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CertlabError(f"cannot resume from {path['last']}: {str(e).splitlines()[0]}") from None
        ckpt.set_rng_state(state["rng"], loader_gen)
        start, best = int(state["epoch"]), float(state.get("best", math.inf))
        global_step, history = int(state.get("global_step", 0)), list(state.get("history", []))
    cfg.save(path["config"])
    atomic_write_text(path["metrics"], "".join(json.dumps(h) + "\n" for h in history))

    maker = ThreatMaker(cfg.norm, info.name, info, cfg.k, cfg.seed, cfg.segment_dirs)
    objective = OBJECTIVES[cfg.objective]
    x_all, y_all = x_train.to(device), y_train.to(device)
    schedule = schedules.describe(asked if state is None else cfg)
    if progress and cfg.objective != "standard":
        print(f"schedule: {schedule}", file=sys.stderr, flush=True)
    chance, K = chance_level(y_train), int(ds["num_classes"])
    warnings = [h["warning"] for h in history if h.get("warning")]

    def payload(epoch):
        return {"arch": cfg.model, "model_params": dict(cfg.model_params), "normalize": cfg.normalize,
                "dataset": ds, "config": cfg.to_dict(), "epoch": epoch, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                "rng": ckpt.rng_state(loader_gen), "best": best, "global_step": global_step, "history": history}

    t_run = time.perf_counter()

    def eta(done):  # the remaining epochs at this session's mean epoch time (the final evaluation not counted)
        return (time.perf_counter() - t_run) / max(done - start, 1) * (cfg.epochs - done)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        chunks = batches(torch.randperm(N, generator=loader_gen).to(device), cfg.batch_size)
        tot = {"loss": 0.0, "correct": 0, "certified": 0, "n": 0}
        has_cert = False
        bar = bars.enter_context(progress_bar(len(chunks), f"epoch {epoch + 1}/{cfg.epochs}", progress,
                                              unit="steps"))
        for i, idx in enumerate(chunks):
            t = epoch + i / len(chunks)
            eps_t = schedules.eps_at(cfg, t)
            ctx = StepContext(cfg, maker, eps_t, schedules.kappa_at(cfg, t), schedules.beta_at(cfg, t), t,
                              seed=(cfg.seed * 1_000_003 + global_step) % (2 ** 62))
            x, y = x_all[idx], y_all[idx]
            loss, st = objective(model, x, y, ctx)
            if not torch.isfinite(loss):
                raise CertlabError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; "
                                   "lower the learning rate or use grad_clip")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if per_batch:
                sched.step()
            global_step += 1
            b = x.shape[0]
            tot["loss"] += float(loss.detach()) * b
            tot["correct"] += st["correct"]
            tot["n"] += b
            if "certified" in st:
                has_cert = True
                tot["certified"] += st["certified"]
            for k in EPOCH_SUMS:  # costs an objective reports per step (ACERT's radius search), summed per epoch
                if k in st:
                    tot[k] = tot.get(k, 0) + st[k]
            bar.update(1)
            post = {"loss": f"{tot['loss'] / tot['n']:.3f}", "acc": f"{tot['correct'] / tot['n']:.3f}",
                    "eps": f"{eps_t:.3g}"}
            if has_cert:
                post["cert"] = f"{tot['certified'] / tot['n']:.3f}"
            bar.set_postfix(post)
        bar.close()
        if sched is not None and not per_batch:
            sched.step()
        val_clean, val_rob, val_unstable = _validate(model, cfg, (x_val, y_val), maker, device)
        t_end = epoch + 1
        record = {"epoch": epoch + 1, "loss": tot["loss"] / tot["n"], "train_acc": tot["correct"] / tot["n"],
                  "train_cert_acc": tot["certified"] / tot["n"] if has_cert else None,
                  "eps": schedules.eps_at(cfg, t_end - 1e-9), "kappa": schedules.kappa_at(cfg, t_end - 1e-9),
                  "beta": schedules.beta_at(cfg, t_end - 1e-9), "lr": opt.param_groups[0]["lr"],
                  "val_clean_error": val_clean, "val_robust_error": val_rob, "val_unstable_relus": val_unstable,
                  "time_s": time.perf_counter() - t0}
        record.update({k: tot[k] for k in EPOCH_SUMS if k in tot})
        if not warnings and not schedules.in_warmup(cfg, t_end) and at_chance(record["train_acc"], chance):
            record["warning"] = chance_warning(cfg, record, chance, K)
            warnings.append(record["warning"])
            print(record["warning"], file=sys.stderr, flush=True)
        history.append(record)
        score = val_rob if val_rob is not None else val_clean
        improved = not schedules.in_warmup(cfg, t_end) and score < best
        if improved:
            best = score
        ckpt.save(path["last"], payload(epoch + 1))
        if improved:
            ckpt.save(path["best"], payload(epoch + 1))
        atomic_write_text(path["metrics"], "".join(json.dumps(h) + "\n" for h in history))
        if progress:
            rob = "" if val_rob is None else f"  val robust/cert err {val_rob:.4f}"
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  train acc {record['train_acc']:.4f}"
                  f"  val err {val_clean:.4f}{rob}  eps {record['eps']:.4g}  {record['time_s']:.1f}s"
                  f"  (elapsed {clock(time.perf_counter() - t_run)}, ETA {clock(eta(epoch + 1))})",
                  file=sys.stderr, flush=True)
    if not os.path.exists(path["best"]) and os.path.exists(path["last"]):
        ckpt.save(path["best"], payload(cfg.epochs))
    summary = {"epochs": cfg.epochs, "last": history[-1] if history else None,
               "train_time_s": sum(h["time_s"] for h in history), "validation": val_desc, "schedule": schedule,
               "warnings": warnings}
    if evaluate:
        from certlab.train.run import evaluate_run

        # this run's evaluation settings, not the checkpoint's: a resumed run may change them (RESUME_MUTABLE), and a
        # run resumed after its last epoch saves no new checkpoint
        summary["eval"] = evaluate_run(out_dir, which="last", progress=progress, certify=cfg.eval_certify,
                                       attacks=cfg.eval_attacks, n=cfg.eval_n, acr=cfg.eval_acr,
                                       restarts=cfg.eval_restarts, device=cfg.device)
    atomic_write_text(path["summary"], json.dumps(summary, indent=2))
    return summary
