"""Training objectives: one small function per objective, same call shape.

``objective(model, x, y, ctx) -> (loss, stats)`` where ``ctx`` is a :class:`StepContext` (the run's config, the
scheduled ε / κ / β of this step, the threat maker and a per-step seed) and ``stats`` holds per-batch counts
(``correct``; ``certified`` for the certified objectives).

- standard:  CE(f(x), y).
- pgd (Madry et al.): CE(f(x_adv), y), x_adv from ``certlab.attacks.run`` (``cfg.attack``, ``cfg.attack_steps``,
  step ``cfg.attack_step``·ε for "pgd"; 1 step with random start and step 1.25·ε is "fast" FGSM-RS training).
- trades (Zhang et al. 2019): CE(f(x), y) + β_T · KL(p(x) ‖ p(x_adv)), x_adv maximising the KL by projected steps.
- certified: κ · CE(f(x), y) + (1 − κ) · CE(z, y) with the worst-case logits z_j = −m_j, z_y = 0 built from the
  margin lower bounds m = ``certlab.margins(model, x, y, threat(ε_t), relaxation)``; plus the Fast-IBP
  warm-up regularisers (see :func:`fast_ibp_regularisers`).
- adaptive (ACERT, Nurlanov et al.): per-sample radii ε_i = certified radius of (x_i, y_i) in [0, ε_t] found without
  gradient (0 when misclassified); loss = κ · CE(f(x), y) + (1 − κ) · CE(z(ε_i), y) + regularisers. Its stats
  also give the cost of the radius search: its wall time (``radius_time_s``), its batched bound evaluations
  (``radius_evals``) and the samples they bounded (``radius_sample_evals``); the loop sums them per epoch.

The state-of-the-art objectives replace the robust term R of κ · CE(f(x), y) + (1 − κ) · R (x_adv from the run's
attack over S(x, ε_t); m(S) the relaxation's margin lower bounds over a set S; L(m) = CE(−m, y)):

- sabr (Müller et al. 2023): R = L(m(S(c, λε_t))), c the attack point projected so S(c, λε_t) ⊆ S(x, ε_t).
- taps (Mao et al. 2023): R = L(m̂)·L(m(S)) (the first factor's gradient scaled by w), m̂ the head's margins at
  latent points searched by PGD in the box the relaxation gives the first part (see :mod:`certlab.train.latent`).
- staps: taps over SABR's small set.
- mtl-ibp (De Palma et al. 2024): R = α · L(m(S)) + (1 − α) · CE(f(x_adv), y).
- exp-ibp: R = L(m(S))^α · CE(f(x_adv), y)^(1 − α).
- cc-ibp: R = L(α · m(S) + (1 − α) · d), d_j = f_y(x_adv) − f_j(x_adv).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import certlab
from certlab.attacks.api import run_with_clean_logits
from certlab.attacks.base import eval_mode
from certlab.attacks.kernels import input_grad, recording
from certlab.bounds import core
from certlab.bounds.api import fold_spec, relu_bounds
from certlab.bounds.spec import margin_table
from certlab.bounds.ibp import interval_pass
from certlab.train import latent, schedules

TAU = 0.5  # target of the tightness regulariser


@dataclass
class StepContext:
    cfg: object
    threat_maker: object
    eps: float
    kappa: float
    beta: float
    t: float  # fractional epoch
    seed: int

    def threat(self, x, eps=None):
        return self.threat_maker(x, self.eps if eps is None else eps)


def _correct(logits, y) -> int:
    return int((logits.argmax(1) == y).sum())


def worst_case_ce(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE of the worst-case logits z = −m (z_y = 0): log(1 + Σ_{j≠y} exp(−m_j)), mean over the batch."""
    return F.cross_entropy(-m, y)


def n_certified(m: torch.Tensor, y: torch.Tensor) -> int:
    mm = m.detach().masked_fill(F.one_hot(y, m.shape[1]).bool(), float("inf"))
    return int((mm > 0).all(1).sum())


def standard(model, x, y, ctx):
    logits = model(x)
    return F.cross_entropy(logits, y), {"correct": _correct(logits, y)}


def pgd(model, x, y, ctx):
    cfg = ctx.cfg
    if ctx.eps > 0:
        threat = ctx.threat(x)
        fixed_step = cfg.attack_step is not None and threat.gradient_attacks
        opts = {"step_size": cfg.attack_step * ctx.eps} if fixed_step else {}
        x_adv, z_clean = run_with_clean_logits(model, x, y, threat, method=cfg.attack, steps=cfg.attack_steps,
                                               restarts=cfg.attack_restarts, seed=ctx.seed, **opts)
    else:
        x_adv = x
        with torch.no_grad(), eval_mode(model):
            z_clean = model(x)
    correct = _correct(z_clean, y)  # eval-mode clean logits, as the attack saw them
    logits_adv = model(x_adv)
    return F.cross_entropy(logits_adv, y), {"correct": correct, "robust": _correct(logits_adv, y)}


def _trades_adversary(model, x, threat, steps, seed):
    """Maximise KL(p(x) ‖ p(x')) over the set by projected (sign / normalised) gradient steps."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_clean = F.softmax(model(x), 1)
        eps = threat.eps_view(x)
        step = 2.5 * eps / steps
        z = threat.project(x + 0.001 * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype), x)
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            with recording(model, z):
                out = model(z)
            kl = F.kl_div(F.log_softmax(out, 1), p_clean, reduction="sum")
            grad = input_grad(model, kl, z)
            z = z.detach() + step * threat.ascent(grad)
            z = threat.project(z, x)
    finally:
        model.train(was)
    return z.detach()


def trades(model, x, y, ctx):
    cfg = ctx.cfg
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if ctx.eps > 0:
        x_adv = _trades_adversary(model, x, ctx.threat(x), cfg.attack_steps, ctx.seed)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
        loss = loss + cfg.trades_beta * kl
    return loss, {"correct": _correct(logits, y)}


def _bound_opts(cfg, beta):
    return {"beta": beta} if cfg.relaxation == "crown-ibp" else {}


def margins_and_relus(model, x, y, threat, relaxation, need_relus: bool, want_logits: bool = False, **opts):
    """(margin lower bounds [B, K], IBP pre-activation bounds [(l, u)] per ReLU or None, clean logits or None).

    For IBP all three come from one pass over the graph with the margin specification folded in: the graph's
    centre forward on the whole batch gives the clean logits (``want_logits``), so certified training needs no
    separate clean forward pass. Not for models with BatchNorm or active Dropout (see _stochastic_or_stateful;
    the logits are then None and the caller runs the model). Loss bounds certify nothing, so they keep the caller's
    float32 precision settings (:func:`certlab.bounds.core.caller_precision`; TF32 convolutions on a GPU)."""
    with core.caller_precision():
        return _margins_and_relus(model, x, y, threat, relaxation, need_relus, want_logits, **opts)


def _margins_and_relus(model, x, y, threat, relaxation, need_relus, want_logits, **opts):
    if relaxation == "ibp" and (need_relus or want_logits):
        core.validate(model, x, threat)
        full = want_logits and not _stochastic_or_stateful(model)
        g = core.build_graph(model, x, full=full)
        K = core.output_dim(g)
        yy = core.check_labels(y, x.shape[0], K, x.device)
        gs = fold_spec(g, margin_table(yy, K, x.dtype))
        pre, (low, _), _ = interval_pass(gs, x, threat, keep_pre=need_relus)
        m = low.masked_fill(F.one_hot(yy, K).bool(), 0.0)
        return m, ([pre[i] for i in gs.relus] if need_relus else None), (g.output_value if full else None)
    m = certlab.margins(model, x, y, threat, method=relaxation, **opts)
    rel = relu_bounds(model, x, threat, "ibp") if need_relus else None
    return m, rel, None


def _stochastic_or_stateful(model) -> bool:
    """BatchNorm (its train-mode forward updates running statistics) or active Dropout (the bound graph treats it
    as the identity): the clean logits must then come from the model itself."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               or (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0)
               for m in model.modules())


def fast_ibp_regularisers(relus, threat, x):
    """Warm-up regularisers of Shi et al. 2021, from IBP pre-activation bounds (l_i, u_i) of the ReLU layers.

    Our reading (documented in docs/training.md):
    - tightness: radius growth per layer. With r_0 the mean radius of the input box and r_i the mean radius
      (u_i − l_i)/2 of layer i, t_i = r_{i−1} / r_i; L_tight = ReLU(τ − mean_i t_i) / τ with τ = 0.5 (IBP
      initialisation keeps t_i ≈ 1; exploding intervals drive t_i → 0).
    - ReLU balance: with P_i = mean ReLU(u_i) (mass that can be active) and N_i = mean ReLU(−l_i) (mass that can be
      inactive), ρ_i = min(P_i, N_i) / max(P_i, N_i); L_relu = mean_i (1 − ρ_i) (0 when balanced, 1 when all
      neurons of a layer are dead or all are active).
    """
    if not relus:
        return x.new_zeros(()), x.new_zeros(())
    lo, hi = threat.interval_hull(x)
    r_prev = ((hi - lo) / 2).mean()
    ts, bal = [], []
    for l, u in relus:
        r = ((u - l) / 2).mean()
        ts.append(r_prev / r.clamp_min(1e-12))
        r_prev = r
        P, N = torch.relu(u).mean(), torch.relu(-l).mean()
        bal.append(1 - torch.min(P, N) / torch.max(P, N).clamp_min(1e-12))
    tight = torch.relu(TAU - torch.stack(ts).mean()) / TAU
    return tight, torch.stack(bal).mean()


def _regularise(model, x, y, ctx, relus, threat):
    cfg = ctx.cfg
    if relus is None:
        return 0.0, {}
    lam = cfg.reg_weight * (1.0 - ctx.eps / cfg.eps) if cfg.eps > 0 else 0.0
    tight, bal = fast_ibp_regularisers(relus, threat, x)
    return lam * (tight + bal), {"reg_tight": float(tight.detach()), "reg_relu": float(bal.detach())}


def _wants_reg(ctx) -> bool:
    return ctx.cfg.fast_ibp_reg and ctx.eps > 0 and schedules.in_warmup(ctx.cfg, ctx.t)


def _clean(model, x, y, kappa):
    """Clean logits and CE; without a graph when κ = 0 (the clean term then has no weight)."""
    if kappa > 0:
        logits = model(x)
        return logits, F.cross_entropy(logits, y)
    with torch.no_grad():
        logits = model(x)
    return logits, 0.0


def certified(model, x, y, ctx):
    cfg = ctx.cfg
    threat = ctx.threat(x)
    m, relus, logits = margins_and_relus(model, x, y, threat, cfg.relaxation, _wants_reg(ctx), want_logits=True,
                                         **_bound_opts(cfg, ctx.beta))
    if logits is None:
        logits, clean = _clean(model, x, y, ctx.kappa)
    else:  # the clean logits of the bound pass (no BatchNorm): CE only when it has weight
        clean = F.cross_entropy(logits, y) if ctx.kappa > 0 else 0.0
        logits = logits.detach()
    loss = ctx.kappa * clean + (1 - ctx.kappa) * worst_case_ce(m, y)
    reg, rstats = _regularise(model, x, y, ctx, relus, threat)
    return loss + reg, {"correct": _correct(logits, y), "certified": n_certified(m, y), **rstats}


def adaptive(model, x, y, ctx):
    cfg = ctx.cfg
    logits, clean = _clean(model, x, y, ctx.kappa)
    right = logits.detach().argmax(1) == y
    search = {"evals": 0, "sample_evals": 0}
    t0 = time.perf_counter()
    if ctx.eps > 0:
        with torch.no_grad():
            radius = certified_radius(model, x, y, ctx.threat(x), cfg.relaxation, ctx.eps, stats=search,
                                      **_bound_opts(cfg, ctx.beta))
        if x.is_cuda:  # the search's kernels are asynchronous: wait for them before reading the clock
            torch.cuda.synchronize(x.device)
        radius = torch.where(right, radius.to(x.dtype), torch.zeros_like(radius, dtype=x.dtype))
    else:
        radius = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    search_s = time.perf_counter() - t0
    threat = ctx.threat(x, radius)
    m, relus, _ = margins_and_relus(model, x, y, threat, cfg.relaxation, _wants_reg(ctx), **_bound_opts(cfg, ctx.beta))
    loss = ctx.kappa * clean + (1 - ctx.kappa) * worst_case_ce(m, y)
    reg, rstats = _regularise(model, x, y, ctx, relus, ctx.threat(x))
    # a sample counts as certified at the scheduled ε when its radius reaches it
    cert = int((radius >= ctx.eps * (1 - 1e-4)).logical_and(right).sum()) if ctx.eps > 0 else int(right.sum())
    return loss + reg, {"correct": _correct(logits, y), "certified": cert,
                        "mean_radius": float(radius.mean()) / ctx.eps if ctx.eps > 0 else 0.0,
                        "radius_time_s": search_s, "radius_evals": search["evals"],
                        "radius_sample_evals": search["sample_evals"], **rstats}


def certified_radius(model, x, y, template, method, max_eps, tol=None, recheck=False, **opts):
    """Per-sample training radius in [0, max_eps] by ``certlab.certified_radius`` (batched root finding, no
    gradient); ``tol`` defaults to max_eps/100 (training needs no more precision, nor float64 rechecks of margins
    within rounding of zero, ``recheck``, nor full float32: reports use certlab.verify.radius directly)."""
    from certlab.verify.radius import certified_radius as cr

    tol = float(max_eps) / 100 if tol is None else tol
    with core.caller_precision():  # a training radius certifies nothing (see margins_and_relus)
        return cr(model, x, y, threat=template, method=method, max_eps=max_eps, tol=tol, solver="brent",
                  recheck=recheck, **opts)


# -- state-of-the-art certified training ----------------------------------------------------------------------
def _adversary(model, x, y, ctx, threat):
    """(x_adv, eval-mode clean logits) by the run's attack over ``threat`` (exact line search on segments)."""
    cfg = ctx.cfg
    opts = {} if cfg.attack_step is None else {"step_size": cfg.attack_step * ctx.eps}  # ignored on segments
    return run_with_clean_logits(model, x, y, threat, method=cfg.attack, steps=cfg.attack_steps,
                                 restarts=cfg.attack_restarts, seed=ctx.seed, **opts)


def _clean_logits_free(model, x):
    with torch.no_grad(), eval_mode(model):
        return model(x)


def _mix(model, x, y, ctx, robust, logits=None):
    """κ · CE(f(x), y) + (1 − κ) · robust; ``logits``: clean logits already at hand (their graph is used when κ > 0
    and they carry one), else the model runs (without a graph when κ = 0)."""
    if ctx.kappa > 0 and (logits is None or not logits.requires_grad):
        logits = model(x)
    elif logits is None:
        logits = _clean_logits_free(model, x)
    clean = F.cross_entropy(logits, y) if ctx.kappa > 0 else 0.0
    return ctx.kappa * clean + (1 - ctx.kappa) * robust, logits.detach()


def _centre(model, x, y, ctx, threat):
    """SABR's (centre, small set, eval-mode clean logits or None)."""
    lam = ctx.cfg.sabr_lambda
    if lam >= 1.0 or ctx.eps == 0:
        return x, threat, None
    x_adv, z0 = _adversary(model, x, y, ctx, threat)
    c, small = latent.small_set(threat, x, x_adv, ctx.eps, lam)
    return c, small, z0


def sabr(model, x, y, ctx):
    cfg = ctx.cfg
    threat = ctx.threat(x)
    c, small, z0 = _centre(model, x, y, ctx, threat)
    m, relus, logits = margins_and_relus(model, c, y, small, cfg.relaxation, _wants_reg(ctx), want_logits=c is x,
                                         **_bound_opts(cfg, ctx.beta))
    loss, logits = _mix(model, x, y, ctx, worst_case_ce(m, y), logits if logits is not None else z0)
    reg, rstats = _regularise(model, c, y, ctx, relus, small)
    st = {"correct": _correct(logits, y), **rstats}
    if ctx.cfg.sabr_lambda >= 1.0:  # the margins are over the whole set: a certificate (a mix of steps would mislead)
        st["certified"] = n_certified(m, y)
    return loss + reg, st


def _scale_grad(t, w: float):
    """t in value, w·∂t in gradient."""
    return t if w == 1.0 else w * t - (w - 1.0) * t.detach()


def _taps_loss(model, c, y, ctx, small):
    """(robust term, certified margins over ``small`` around c, ReLU bounds for the regularisers, clean logits at c
    or None). Inside the ε ramp, or for ε = 0, the term is the certified loss alone (as the authors anneal)."""
    cfg = ctx.cfg
    first, head, n_first = latent.split(model, cfg.taps_head)
    if cfg.relaxation == "ibp":
        m, relus, logits = margins_and_relus(model, c, y, small, "ibp", True, want_logits=True)
        lo, hi = relus[n_first - 1]
    else:
        m, _, logits = margins_and_relus(model, c, y, small, cfg.relaxation, False, **_bound_opts(cfg, ctx.beta))
        with core.caller_precision():
            pre = relu_bounds(first, c, small, cfg.relaxation, **_bound_opts(cfg, ctx.beta))
        lo, hi = pre[n_first - 1]
        relus = relu_bounds(model, c, small, "ibp") if _wants_reg(ctx) else None
    cert = worst_case_ce(m, y)
    if ctx.eps == 0 or schedules.in_warmup(cfg, ctx.t):
        return cert, m, relus, logits
    lo, hi = torch.relu(lo), torch.relu(hi)
    K = m.shape[1]
    gen = torch.Generator(device=c.device).manual_seed(ctx.seed)
    t = rest = None
    if 0 < cfg.taps_targets < K - 1:  # search only the k most violated classes; the others keep their bounds
        t, rest = latent.worst_targets(m, y, cfg.taps_targets), m
    z = latent.search(head, lo, hi, y, K, cfg.attack_steps, gen, targets=t)
    est = latent.estimate(head, latent.connect(z, lo, hi, cfg.taps_threshold), y, K, targets=t, rest=rest)
    robust = _scale_grad(worst_case_ce(est, y), cfg.taps_grad_scale)
    if cfg.taps_ibp_mult:
        robust = robust * cert
    return robust, m, relus, logits


def taps(model, x, y, ctx):
    threat = ctx.threat(x)
    robust, m, relus, logits = _taps_loss(model, x, y, ctx, threat)
    loss, logits = _mix(model, x, y, ctx, robust, logits)
    reg, rstats = _regularise(model, x, y, ctx, relus if _wants_reg(ctx) else None, threat)
    return loss + reg, {"correct": _correct(logits, y), "certified": n_certified(m, y), **rstats}


def staps(model, x, y, ctx):
    threat = ctx.threat(x)
    c, small, z0 = _centre(model, x, y, ctx, threat)
    robust, m, relus, logits = _taps_loss(model, c, y, ctx, small)
    loss, logits = _mix(model, x, y, ctx, robust, logits if c is x else z0)
    reg, rstats = _regularise(model, c, y, ctx, relus if _wants_reg(ctx) else None, small)
    st = {"correct": _correct(logits, y), **rstats}
    if ctx.cfg.sabr_lambda >= 1.0:
        st["certified"] = n_certified(m, y)
    return loss + reg, st


def _expressive(kind):
    """mtl-ibp, exp-ibp and cc-ibp: the certified and the adversarial part over the same set S(x, ε_t)."""

    def objective(model, x, y, ctx):
        cfg = ctx.cfg
        a = cfg.cert_alpha
        threat = ctx.threat(x)
        m = relus = logits = None
        if a > 0 or _wants_reg(ctx):
            m, relus, logits = margins_and_relus(model, x, y, threat, cfg.relaxation, _wants_reg(ctx),
                                                 want_logits=True, **_bound_opts(cfg, ctx.beta))
        z_adv = z0 = None
        if a < 1:
            x_adv, z0 = _adversary(model, x, y, ctx, threat) if ctx.eps > 0 else (x, None)
            z_adv = model(x_adv)
        if kind == "cc":
            if a == 1:
                d = m
            else:
                zy = z_adv.gather(1, y.view(-1, 1))
                d = (zy - z_adv) if a == 0 else a * m + (1 - a) * (zy - z_adv)
            robust = worst_case_ce(d, y)
        else:
            cert = worst_case_ce(m, y) if a > 0 else None
            adv = F.cross_entropy(z_adv, y) if a < 1 else None
            if a == 1 or a == 0:
                robust = cert if a == 1 else adv
            elif kind == "mtl":
                robust = a * cert + (1 - a) * adv
            else:  # the convex combination of the logarithms
                tiny = torch.finfo(cert.dtype).tiny
                robust = torch.exp(a * cert.clamp_min(tiny).log() + (1 - a) * adv.clamp_min(tiny).log())
        loss, logits = _mix(model, x, y, ctx, robust, logits if logits is not None else z0)
        reg, rstats = _regularise(model, x, y, ctx, relus, threat)
        st = {"correct": _correct(logits, y), **rstats}
        if m is not None:
            st["certified"] = n_certified(m, y)
        if z_adv is not None:
            st["robust"] = _correct(z_adv.detach(), y)
        return loss + reg, st

    objective.__name__ = f"{kind}_ibp"
    return objective


mtl_ibp, exp_ibp, cc_ibp = _expressive("mtl"), _expressive("exp"), _expressive("cc")

CERTIFIED = ("certified", "adaptive", "sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")
"""Objectives whose models are validated by certification (over the whole ε-set, never SABR's small one)."""

OBJECTIVES = {"standard": standard, "pgd": pgd, "trades": trades, "certified": certified, "adaptive": adaptive,
              "sabr": sabr, "taps": taps, "staps": staps, "mtl-ibp": mtl_ibp, "exp-ibp": exp_ibp, "cc-ibp": cc_ibp}
