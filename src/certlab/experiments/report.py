"""``certlab report DIR``: Markdown + HTML with tables (mean ± s.e. over seeds) and PNG figures, read only from
``DIR/results.sqlite`` (and ``DIR/compare.json`` when ``certlab demo`` wrote one).

For each experiment in the database:

- cells are grouped into *methods* (AT, TRADES, standard, certified training by its relaxation, ACERT), a
  *panel* (the other categorical axes: norm, dataset, model, ...) and the numeric *x axis* (the varied numeric
  grid key: k, eps, data.margin, kappa ...); seeds are aggregated: mean ± s.e. = std (ddof 1) / √n;
- a table per panel and, when there is a numeric axis, a figure "error vs x" (standard, robust, certified error,
  unstable ReLUs; the error panels share one y range starting at 0) and the certified-minus-AT gap with its trend;
- lines of different methods get different markers and line styles and a small horizontal offset, and a panel
  names the methods whose lines coincide, so a legend entry never hides behind another line;
- a per-relaxation table when several relaxations were trained;
- trade-off curves clean accuracy vs ACR (as % of ε) when ACR was measured;
- a *trade-off study* (an experiment that varies a method's trade-off knob: κ, SABR's λ, MTL-/EXP-/CC-IBP's α, TAPS's
  w or c, the training ε at a fixed evaluation ε; see :data:`KNOBS`) is reported per panel as one curve per method
  through its own knob: a table (method, knob value, errors, ACR, certified error by every certifier measured), a
  figure clean accuracy vs ACR (IBP radii, the ACERT paper's metric, when measured) and one vs certified accuracy
  by the strongest certifier measured, points = mean over seeds with ± s.e. bars on both axes, labelled with the
  knob value; plus the cost of ACERT's radius search per epoch (from the training history) when recorded;
- unstable ReLUs over training (from each cell's per-epoch history) when recorded;
- before the experiments: the side-by-side comparison ``certlab demo`` stores in ``DIR/compare.json``, when present.

"Unstable ReLUs" is a count per sample: the ReLUs whose IBP pre-activation interval crosses zero (l < 0 < u),
summed over layers, averaged over the evaluated samples.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import time

from certlab.errors import CertlabError
from certlab.experiments.store import Store
from certlab.fileio import mkstemp, write_text

RELAX_NAMES = {"ibp": "IBP", "hbox": "hBox", "deepz": "DeepZ", "fastlin": "Fast-Lin", "crown": "CROWN",
               "crown-ibp": "CROWN-IBP", "alpha-crown": "α-CROWN"}
OBJ_NAMES = {"pgd": "AT", "trades": "TRADES", "standard": "standard"}
CERTIFIED_NAMES = {"fastlin": "Fast-Lin (COAP bound)"}  # training methods named unlike their relaxation
METHOD_KEYS = ("objective", "relaxation")
AXIS_LABELS = {"k": "k (number of segments)", "eps": "ε", "data.margin": "margin γ", "kappa_end": "κ",
               "kappa_start": "κ", "seed": "seed"}
MAIN_METRICS = (("clean_error", "standard error"), ("robust_error", "robust error"),
                ("certified_error.train", "certified error"), ("unstable_relus", "unstable ReLUs"))
UNSTABLE_UNIT = "unstable ReLUs (mean count per sample)"
STYLES = (("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":"))
_DIAG = re.compile(r"^diag\.own\.")  # relaxation diagnostics of the training relaxation (run_cell_diagnostics)


# ---- grouping ---------------------------------------------------------------------------------------------
def method_label(config: dict) -> str:
    """AT / TRADES / standard for empirical objectives; for certified training the method the paper names:

    - relaxation ``ibp`` with Fast-IBP's extras (``ibp_init`` and/or ``fast_ibp_reg``, Shi et al. 2021):
      "Fast-IBP"; without them "IBP" (plain IBP, Gowal et al.);
    - ``fastlin``: "Fast-Lin (COAP bound)": the dual bound of Wong & Kolter's COAP with its fixed slopes u/(u−l)
      is Fast-Lin's bound; certlab computes it exactly (COAP's training estimates it with random projections);
    - any other relaxation by its name (CROWN-IBP, ...); ACERT (relaxation) for ``adaptive``.
    """
    obj = config.get("objective", "standard")
    relax = RELAX_NAMES.get(config.get("relaxation"), str(config.get("relaxation")))
    if obj in OBJ_NAMES:
        return OBJ_NAMES[obj]
    if obj == "certified":
        if config.get("relaxation") == "ibp" and (config.get("ibp_init") or config.get("fast_ibp_reg")):
            return "Fast-IBP"
        return CERTIFIED_NAMES.get(config.get("relaxation"), relax)
    if obj == "adaptive":
        return f"ACERT ({relax})"
    return f"{obj} ({relax})"


def method_keys(spec: dict) -> set:
    """The method keys plus every key zipped with one of them: a zip group that advances ``objective`` /
    ``relaxation`` together with each method's recipe (epochs, lr, batch_size, ibp_init, ...) is the method axis,
    not a set of panels or an x axis."""
    keys = set(METHOD_KEYS)
    for g in spec.get("zip", []):
        if keys & set(g):
            keys |= set(g)
    return keys


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_seed_axis(key: str) -> bool:
    """``seed`` and any nested ``*.seed`` (e.g. ``data.seed``) are replicates, aggregated over."""
    return key == "seed" or key.endswith(".seed")


def varied_axes(spec: dict, exclude) -> list:
    """The experiment's grid and zip keys, in order, without the seed axes and the keys in ``exclude``."""
    axes = list(spec.get("grid", {}))
    for g in spec.get("zip", []):
        axes.extend(g)
    return [a for a in dict.fromkeys(axes) if not is_seed_axis(a) and a not in exclude]


def split_axes(spec: dict, cells: list) -> tuple:
    """(x axis or None, panel axes) from the experiment's varied keys (seed and method keys excluded)."""
    rest = varied_axes(spec, method_keys(spec))
    numeric = [a for a in rest if all(_is_number(c["params"].get(a)) for c in cells if a in c["params"])]
    numeric = [a for a in numeric if len({c["params"].get(a) for c in cells}) > 1]
    x = numeric[0] if numeric else None
    tied = set()  # numeric keys zipped with x vary with it (e.g. kappa_end with kappa_start): not panels
    for g in spec.get("zip", []):
        if x in g:
            tied |= {a for a in g if a in numeric}
    panels = [a for a in rest if a != x and a not in tied]
    return x, panels


def mean_se(values) -> tuple:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None, 0
    m = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return m, se, len(vals)


def metric(cell: dict, key: str):
    m = cell["metrics"]
    if key == "certified_error.train" and key not in m:
        return m.get("certified_error.best")
    if key == "acr.train" and key not in m:
        return m.get("acr.best")
    return m.get(key)


def aggregate(cells: list, x, panels) -> dict:
    """{(panel tuple, method, x value): {metric: (mean, se, n)}} over seeds."""
    groups = {}
    for c in cells:
        key = (tuple((p, c["params"].get(p)) for p in panels), method_label(c["config"]),
               c["params"].get(x) if x else None)
        groups.setdefault(key, []).append(c)
    out = {}
    for key, members in groups.items():
        keys = set().union(*(m["metrics"] for m in members)) | {"certified_error.train", "acr.train"}
        out[key] = {k: mean_se([metric(m, k) for m in members]) for k in keys}
        out[key]["_seeds"] = sorted({m["params"].get("seed", m["config"].get("seed")) for m in members},
                                    key=str)
    return out


# ---- formatting -------------------------------------------------------------------------------------------
def fmt(stat, percent=True) -> str:
    m, se, n = stat if stat else (None, None, 0)
    if m is None:
        return "—"
    scale = 100.0 if percent else 1.0
    s = f"{m * scale:.1f}" if percent else f"{m:.3g}"
    if se is not None:
        s += f" ± {se * scale:.1f}" if percent else f" ± {se:.2g}"
    return s


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "all"


def _panel_name(panel) -> str:
    return ", ".join(f"{k}={v}" for k, v in panel) if panel else ""


def _order(methods) -> list:
    pref = ["standard", "AT", "TRADES"]
    return sorted(methods, key=lambda m: (pref.index(m) if m in pref else len(pref), m))


# ---- figures ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    folder = os.path.dirname(path)
    fd, tmp = mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _style(j) -> dict:
    marker, ls = STYLES[j % len(STYLES)]
    return {"marker": marker, "linestyle": ls, "markersize": 6 - 0.6 * (j % 3)}


def coincident(series: dict, tol: float = 1e-9) -> list:
    """[(method, method it coincides with)] for series {method: [(x, y), ...]} equal point for point (within
    ``tol``) to an earlier one."""
    out, seen = [], []
    for m, pts in series.items():
        for other, ref in seen:
            if len(ref) == len(pts) and all(a[0] == b[0] and abs(a[1] - b[1]) <= tol * max(1.0, abs(b[1]))
                                            for a, b in zip(pts, ref)):
                out.append((m, other))
                break
        else:
            seen.append((m, pts))
    return out


def _note_coincident(ax, series, title):
    """``title``, plus a second line naming the methods whose lines lie on top of another's."""
    same = coincident(series)
    note = "; ".join(f"{a} = {b}" for a, b in same)
    ax.set_title(f"{title}\n(same values: {note})" if note else title, fontsize=10 if note else None)


def _integer_ticks(ax, values):
    if values and all(float(v).is_integer() for v in values if _is_number(v)):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure_vs_x(agg, panel, x, metrics, path, title):
    """One panel per metric; the error panels share one y range from 0, the unstable-ReLU panel starts at 0, so a
    small wobble does not read as a trend. Methods are offset by a small fraction of the x range (dodged)."""
    plt = _plt()
    methods = _order({k[1] for k in agg if k[0] == panel})
    xs_all = [k[2] for k in agg if k[0] == panel and _is_number(k[2])]
    span = (max(xs_all) - min(xs_all)) if xs_all else 0.0
    dodge = 0.02 * span if span > 0 else 0.0
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    top = {"error": 0.0, "unstable": 0.0}
    for ax, (key, label) in zip(axes[0], metrics):
        kind = "unstable" if key == "unstable_relus" else "error"
        series = {}
        for j, mth in enumerate(methods):
            pts = sorted((k[2], v[key]) for k, v in agg.items() if k[0] == panel and k[1] == mth
                         and v.get(key, (None,))[0] is not None)
            if not pts:
                continue
            scale = 1.0 if kind == "unstable" else 100.0
            ys = [p[1][0] * scale for p in pts]
            es = [(p[1][1] or 0.0) * scale for p in pts]
            series[mth] = [(p[0], y) for p, y in zip(pts, ys)]
            off = (j - (len(methods) - 1) / 2) * dodge
            xs = [p[0] + off if _is_number(p[0]) else p[0] for p in pts]
            ax.errorbar(xs, ys, yerr=es, capsize=3, label=mth, **_style(j))
            top[kind] = max(top[kind], max(y + e for y, e in zip(ys, es)))
        _note_coincident(ax, series, label)
        _integer_ticks(ax, xs_all)
        ax.set_xlabel(AXIS_LABELS.get(x, x))
        ax.set_ylabel(UNSTABLE_UNIT if kind == "unstable" else label + " (%)")
        ax.grid(alpha=0.3)
    for ax, (key, _) in zip(axes[0], metrics):  # one y range per quantity
        kind = "unstable" if key == "unstable_relus" else "error"
        ax.set_ylim(0.0, max(top[kind] * 1.08, 1.0))
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def figure_tradeoff(points, panel, path, title, xkind, xlabel):
    """Clean accuracy (y) against ``xkind`` (x): "acr" (the ACR metric of :func:`tradeoff_metrics`, % of ε) or
    "cert" (certified accuracy, %), one curve per method through its knob sweep (points in knob order), each point
    the mean over seeds with ± s.e. bars on both axes and its knob value written next to it. ``points`` as
    :func:`tradeoff_points` returns them. False (no file) when no point has both coordinates."""
    plt = _plt()
    acr_key, cert_key = tradeoff_metrics(points, panel)
    xkey = acr_key if xkind == "acr" else cert_key
    fig, ax = plt.subplots(figsize=(6, 4.4))
    drawn = False
    methods = _order({k[1] for k in points if k[0] == panel})
    for j, mth in enumerate(methods):
        pts = []
        for k, v in points.items():
            if k[0] != panel or k[1] != mth or xkey is None:
                continue
            xs, ce = v.get(xkey), v.get("clean_error")
            if not xs or xs[0] is None or not ce or ce[0] is None:
                continue
            xv = xs[0] * 100 if xkind == "acr" else (1 - xs[0]) * 100
            pts.append((_knob_sort(k[2]), xv, (xs[1] or 0.0) * 100, (1 - ce[0]) * 100, (ce[1] or 0.0) * 100,
                        knob_text(k[2])))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0])
        ax.errorbar([p[1] for p in pts], [p[3] for p in pts], xerr=[p[2] for p in pts], yerr=[p[4] for p in pts],
                    capsize=2, label=mth, **_style(j))
        for p in pts:
            if p[5]:
                ax.annotate(p[5], (p[1], p[3]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        drawn = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clean accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, path)
    plt.close(fig)
    return drawn


# ---- trade-off curves: one per method through its own knob -------------------------------------------------
# each method's trade-off knob: ACERT's and Fast-IBP's κ, SABR's / STAPS's λ, MTL-IBP's / EXP-IBP's / CC-IBP's α,
# TAPS's gradient scale and connector threshold, and the training ε (a knob only while the evaluation ε is fixed)
KNOBS = {"kappa_start": "κ₀", "kappa_end": "κ", "sabr_lambda": "λ", "cert_alpha": "α", "taps_grad_scale": "w",
         "taps_threshold": "c", "eps": "ε_train"}
CERT_ORDER = ("alpha-crown", "crown", "crown-ibp", "deepz", "fastlin", "hbox", "ibp")  # strongest first


def _value(cell, key):
    return cell["params"][key] if key in cell["params"] else cell["config"].get(key)


def tradeoff_axes(spec, cells) -> tuple:
    """(knob keys, panel axes) of a trade-off experiment: the knob keys are the :data:`KNOBS` among the varied
    axes that take several values (``eps`` only when every cell fixes ``eval_eps``); the panel axes are the other
    varied axes that vary within some method (an axis constant within each method, e.g. a flag zipped with the
    objective, belongs to the method). No knob: ((), ()) and the report is the plain one."""
    axes = varied_axes(spec, METHOD_KEYS)  # knobs zipped with the objective are axes here
    knobs = [k for k in KNOBS if k in axes and len({json.dumps(_value(c, k)) for c in cells}) > 1]
    if "eps" in knobs and any(c["config"].get("eval_eps") is None for c in cells):
        knobs.remove("eps")
    if not knobs:
        return (), ()
    by_method = {}
    for c in cells:
        by_method.setdefault(method_label(c["config"]), []).append(c)
    panels = [a for a in axes if a not in knobs and
              any(len({json.dumps(_value(c, a)) for c in grp}) > 1 for grp in by_method.values())]
    return tuple(knobs), tuple(panels)


def knob_text(kv) -> str:
    """``(("kappa_start", 0.5), ("kappa_end", 0.5))`` -> "κ=0.5" (κ₀ shown only when it differs from κ)."""
    d = dict(kv)
    if "kappa_start" in d and "kappa_end" in d and d["kappa_start"] == d["kappa_end"]:
        d.pop("kappa_start")
    return ", ".join(f"{KNOBS.get(k, k)}={_num(v)}" for k, v in d.items())


def _knob_sort(kv):
    return tuple((0, v) if _is_number(v) else (1, str(v)) for _, v in kv)


def radius_cost(cell) -> dict | None:
    """ACERT's radius search in one cell, from its per-epoch history, over the epochs in which it ran
    (``radius_evals`` > 0): mean seconds per epoch, share of those epochs' time, mean batched bound evaluations per
    epoch, mean epoch time. None when the history records no search."""
    rows = [r for r in cell.get("history") or [] if _is_number(r.get("radius_evals")) and r["radius_evals"] > 0
            and _is_number(r.get("radius_time_s")) and _is_number(r.get("time_s"))]
    if not rows:
        return None
    n, t_search, t_epoch = len(rows), sum(r["radius_time_s"] for r in rows), sum(r["time_s"] for r in rows)
    return {"radius_s": t_search / n, "radius_share": t_search / t_epoch if t_epoch > 0 else None,
            "radius_evals": sum(r["radius_evals"] for r in rows) / n, "epoch_s": t_epoch / n, "epochs": n}


def tradeoff_points(cells, knobs, panels) -> dict:
    """{(panel tuple, method, knob tuple): {metric: (mean, s.e., n)}} over seeds. A method's knob tuple holds the
    knob keys that vary among that method's cells of the panel (ACERT's κ, SABR's λ, ...), so each method is one
    curve through its own sweep. The ACERT radius-search cost (:func:`radius_cost`) is under ``cost.<key>``."""
    by_method = {}
    for c in cells:
        panel = tuple((p, _value(c, p)) for p in panels)
        by_method.setdefault((panel, method_label(c["config"])), []).append(c)
    groups = {}
    for (panel, mth), grp in by_method.items():
        keys = [k for k in knobs if len({json.dumps(_value(c, k)) for c in grp}) > 1]
        for c in grp:
            groups.setdefault((panel, mth, tuple((k, _value(c, k)) for k in keys)), []).append(c)
    out = {}
    for key, members in groups.items():
        mkeys = set().union(*(m["metrics"] for m in members)) | {"certified_error.train", "acr.train"}
        stats = {k: mean_se([metric(m, k) for m in members]) for k in mkeys}
        costs = [radius_cost(m) for m in members]
        for ck in ("radius_s", "radius_share", "radius_evals", "epoch_s"):
            stats[f"cost.{ck}"] = mean_se([c[ck] for c in costs if c and c[ck] is not None])
        for vk in ("val_robust_error", "val_clean_error"):  # the last epoch's validation numbers
            stats[f"val.{vk[4:]}"] = mean_se([(m.get("history") or [{}])[-1].get(vk) for m in members])
        stats["_val_split"] = all((m["config"].get("val_split") or 0) > 0 for m in members)
        stats["_seeds"] = sorted({_value(m, "seed") for m in members}, key=str)
        stats["_eval_eps"] = sorted({m["config"].get("eval_eps") if m["config"].get("eval_eps") is not None
                                     else m["config"].get("eps") for m in members}, key=str)
        out[key] = stats
    return out


def _measured(points, panel, key) -> bool:
    return any(v.get(key, (None,))[0] is not None for k, v in points.items() if k[0] == panel)


def tradeoff_metrics(points, panel) -> tuple:
    """(ACR key, certified-error key) of a panel: ACR by IBP radii (the paper's metric) when measured, else by the
    training relaxation; certified error by the strongest certifier measured (:data:`CERT_ORDER`), else by the
    training relaxation; None when not measured."""
    acr = next((k for k in ("acr.ibp", "acr.train") if _measured(points, panel, k)), None)
    cert = next((f"certified_error.{m}" for m in CERT_ORDER if _measured(points, panel, f"certified_error.{m}")),
                "certified_error.train" if _measured(points, panel, "certified_error.train") else None)
    return acr, cert


def _metric_name(key) -> str:
    if key is None:
        return ""
    m = key.split(".", 1)[1]
    return "training relaxation" if m == "train" else RELAX_NAMES.get(m, m)


def _eps_text(points, panel) -> str:
    eps = sorted({e for k, v in points.items() if k[0] == panel for e in v["_eval_eps"]}, key=str)
    return f"ε = {_num(eps[0])}" if len(eps) == 1 else "the cells' evaluation ε"


def select_on_validation(points, keys) -> list:
    """Per method, the key of the knob value with the lowest validation error (certified error by the training
    relaxation, or robust error, on the validation samples at the last epoch; mean over seeds; ties by validation
    clean error); a method with one knob value keeps it; methods without validation numbers are left out; nothing
    when no method has several knob values (no choice was made). CTBench's choice of knob."""
    best = {}
    for k in keys:
        v = points[k]
        score = (v.get("val.robust_error", (None,))[0], v.get("val.clean_error", (None,))[0])
        if score[0] is None:
            continue
        if k[1] not in best or score < best[k[1]][0]:
            best[k[1]] = (score, k)
    counts = {}
    for k in keys:
        counts[k[1]] = counts.get(k[1], 0) + 1
    if not any(n > 1 for n in counts.values()):
        return []
    return [k for _, k in best.values()]


def _selected_table(doc, points, keys, acr_key, cert_key):
    chosen = select_on_validation(points, keys)
    if not chosen:
        return
    held = all(points[k]["_val_split"] for k in chosen)
    doc.p("Knob selected on validation (CTBench's protocol): per method, the knob value with the lowest certified "
          "error by the training relaxation on the validation samples at the last epoch, then its test numbers. "
          + ("The validation samples are training samples held out from training (val_split)." if held else
             "Some cells validated on the first test samples (val_split = 0): their selection has seen test data, "
             "so their test numbers are optimistic."))
    doc.table(["method", "knob", "seeds", "val. cert. err %", "standard err %", "robust err %",
               f"cert. err % {_metric_name(cert_key)}" if cert_key else "cert. err %",
               f"ACR % ({_metric_name(acr_key)})" if acr_key else "ACR %"],
              [[k[1], knob_text(k[2]) or "—", len(points[k]["_seeds"]), fmt(points[k].get("val.robust_error")),
                fmt(points[k].get("clean_error")), fmt(points[k].get("robust_error")),
                fmt(points[k].get(cert_key)) if cert_key else "—", fmt(points[k].get(acr_key)) if acr_key else "—"]
               for k in chosen])


def _tradeoff_panel(doc, points, panel, fig_dir, rel, slug, full):
    """The trade-off table, the two trade-off figures and the radius-search cost table of one panel."""
    acr_key, cert_key = tradeoff_metrics(points, panel)
    eps = _eps_text(points, panel)
    certs = [m for m in CERT_ORDER[::-1] if _measured(points, panel, f"certified_error.{m}")]
    order = _order({k[1] for k in points if k[0] == panel})
    keys = sorted((k for k in points if k[0] == panel), key=lambda k: (order.index(k[1]), _knob_sort(k[2])))
    header = ["method", "knob", "seeds", "standard err %", "robust err %"] + \
        ([f"ACR % of ε ({_metric_name(acr_key)})"] if acr_key else []) + \
        [f"cert. err % {RELAX_NAMES.get(m, m)}" for m in certs] + ["unstable ReLUs / sample"]
    rows = [[k[1], knob_text(k[2]) or "—", len(points[k]["_seeds"]), fmt(points[k].get("clean_error")),
             fmt(points[k].get("robust_error"))] + ([fmt(points[k].get(acr_key))] if acr_key else []) +
            [fmt(points[k].get(f"certified_error.{m}")) for m in certs] + [fmt(points[k].get("unstable_relus"), False)]
            for k in keys]
    doc.p(f"Trade-off table: one row per method and knob value (κ: weight of the clean loss; λ: SABR's small-set "
          f"radius as a fraction of ε; α: weight of the certified part of MTL-/EXP-/CC-IBP), mean ± s.e. over "
          f"seeds; certified error and ACR at {eps} (ACR: mean certified radius, 0 for misclassified samples, as a "
          f"% of that ε).")
    doc.table(header, rows)
    if acr_key:
        fname = f"{slug}-tradeoff.png"
        if figure_tradeoff(points, panel, os.path.join(fig_dir, fname), f"{full}: clean accuracy vs ACR", "acr",
                           f"ACR by {_metric_name(acr_key)} radii (% of {eps})"):
            doc.img(f"{rel}/{fname}", f"trade-off: clean accuracy vs ACR by {_metric_name(acr_key)} radii ({full}); "
                                      "one curve per method through its knob; mean ± s.e. over seeds")
    if cert_key:
        fname = f"{slug}-tradeoff-cert.png"
        if figure_tradeoff(points, panel, os.path.join(fig_dir, fname), f"{full}: clean vs certified accuracy",
                           "cert", f"certified accuracy at {eps} by {_metric_name(cert_key)} (%)"):
            doc.img(f"{rel}/{fname}", f"trade-off: clean accuracy vs certified accuracy at {eps} by "
                                      f"{_metric_name(cert_key)} ({full}); mean ± s.e. over seeds")
    _selected_table(doc, points, keys, acr_key, cert_key)
    costed = [k for k in keys if points[k]["cost.radius_s"][0] is not None]
    if costed:
        doc.p("Cost of ACERT's radius search (per-sample certified radius by batched root finding, no gradient), "
              "from the training history, over the epochs in which it ran (ε_t > 0): wall seconds per epoch, its "
              "share of the epoch time (training steps and per-epoch validation), batched bound evaluations per "
              "epoch; mean ± s.e. over seeds.")
        doc.table(["method", "knob", "seeds", "radius search s / epoch", "share of epoch time %",
                   "bound evaluations / epoch", "epoch s"],
                  [[k[1], knob_text(k[2]) or "—", len(points[k]["_seeds"]), fmt(points[k]["cost.radius_s"], False),
                    fmt(points[k]["cost.radius_share"]), fmt(points[k]["cost.radius_evals"], False),
                    fmt(points[k]["cost.epoch_s"], False)] for k in costed])


def _unstable_key(history) -> str | None:
    for row in history or []:
        for k, v in row.items():
            if "unstable" in k and _is_number(v):
                return k
    return None


def figure_unstable(cells, panel, panels, x, path, title):
    """Unstable ReLUs per epoch (mean over seeds), one line per method, one subplot per x value."""
    plt = _plt()
    mine = [c for c in cells if tuple((p, c["params"].get(p)) for p in panels) == panel]
    xs = sorted({c["params"].get(x) for c in mine}) if x else [None]  # this panel's values only
    fig, axes = plt.subplots(1, len(xs), figsize=(3.6 * len(xs), 3.2), squeeze=False, sharey=True)
    drawn, top = False, 0.0
    order = _order({method_label(c["config"]) for c in mine})  # one style per method across the subplots
    for ax, xv in zip(axes[0], xs):
        series = {}
        for c in cells:
            if tuple((p, c["params"].get(p)) for p in panels) != panel or (x and c["params"].get(x) != xv):
                continue
            key = _unstable_key(c.get("history"))
            if key is None:
                continue
            for row in c["history"]:
                if _is_number(row.get(key)):
                    ep = row.get("epoch", len(series))
                    series.setdefault(method_label(c["config"]), {}).setdefault(ep, []).append(row[key])
        lines = {}
        for mth in _order(series):
            eps = sorted(series[mth])
            ys = [statistics.fmean(series[mth][e]) for e in eps]
            lines[mth] = list(zip(eps, ys))
            ax.plot(eps, ys, label=mth, markevery=max(1, len(eps) // 8), **_style(order.index(mth)))
            top = max(top, max(ys))
            drawn = True
        _note_coincident(ax, lines, f"{AXIS_LABELS.get(x, x)} = {xv}" if x else "")
        _integer_ticks(ax, [e for pts in lines.values() for e, _ in pts])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(UNSTABLE_UNIT)
    axes[0][0].set_ylim(0.0, max(top * 1.1, 1.0))  # shared by the subplots
    if drawn:
        labelled = [a for a in axes.flat if a.get_legend_handles_labels()[0]]  # a subplot may have no history
        labelled[0].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        _save(fig, path)
    plt.close(fig)
    return drawn


# ---- gap analysis -----------------------------------------------------------------------------------------
def gap_rows(agg, panel, key) -> list:
    """[(x, method, gap mean, AT mean)] of certified-training minus AT error at each x."""
    rows = []
    xs = sorted({k[2] for k in agg if k[0] == panel and k[2] is not None})
    for xv in xs:
        at = agg.get((panel, "AT", xv), {}).get(key)
        if not at or at[0] is None:
            continue
        for mth in _order({k[1] for k in agg if k[0] == panel and k[2] == xv}):
            if mth in ("AT", "TRADES", "standard"):
                continue
            v = agg[(panel, mth, xv)].get(key)
            if v and v[0] is not None:
                rows.append((xv, mth, v[0] - at[0], at[0]))
    return rows


def trend_sentence(rows, what, x, tol=0.005, short=None) -> str:
    """Plain sentences on the gap (certified-training error − AT error, in points) per certified method: at how many
    values of x it is above AT, the gap at the smallest and the largest x, and whether it rises or falls between them
    by more than ``tol`` (0.5 points) or shows no trend; with three or more values, at how many steps it rose."""
    by_m = {}
    for xv, mth, g, _ in rows:
        by_m.setdefault(mth, []).append((xv, g))
    parts = []
    for mth, pts in by_m.items():
        pts.sort()
        if len(pts) < 2:
            continue
        above = sum(g > 0 for _, g in pts)
        change = pts[-1][1] - pts[0][1]
        if change > tol:
            trend = f"a rise of {change * 100:.1f} points"
        elif change < -tol:
            trend = f"a fall of {-change * 100:.1f} points"
        else:
            trend = f"no trend (the change is within ±{tol * 100:.1f} points)"
        if len(pts) > 2:
            ups = sum(b[1] - a[1] > tol / 5 for a, b in zip(pts, pts[1:]))
            trend += f"; it rose at {ups} of the {len(pts) - 1} steps between neighbouring values"
        at = short or x
        parts.append(f"{mth} has the higher {what.lower()} at {above} of {len(pts)} values of {x}; the gap goes from "
                     f"{pts[0][1] * 100:+.1f} points at {at} = {_num(pts[0][0])} to {pts[-1][1] * 100:+.1f} points at "
                     f"{at} = {_num(pts[-1][0])}: {trend}.")
    if not parts:
        return ""
    return (f"{what}, certified training minus AT (gap in percentage points; positive: certified training has the "
            f"higher error). " + " ".join(parts))


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def identical_note(agg, panel, x) -> str:
    """A warning when every method's metrics are identical at every value of x (the axis had no effect)."""
    if not x:
        return ""
    keys = ("clean_error", "robust_error", "certified_error.train", "unstable_relus")
    by_m = {}
    for (p, mth, xv), v in agg.items():
        if p == panel:
            by_m.setdefault(mth, {})[xv] = tuple(v.get(k, (None,))[0] for k in keys)
    multi = [vals for vals in by_m.values() if len(vals) > 1]
    if multi and all(len(set(vals.values())) == 1 for vals in multi):
        return (f"Note: for every method the metrics are identical at all values of {AXIS_LABELS.get(x, x)}: this "
                f"axis had no effect on training or evaluation (the cells differ only in the config value), so no "
                f"trend in {x} can be read from these cells.")
    return ""


# ---- document blocks --------------------------------------------------------------------------------------
class Doc:
    def __init__(self):
        self.blocks = []

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, header, rows):
        self.blocks.append(("table", header, rows))

    def img(self, rel, caption):
        self.blocks.append(("img", rel, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "|".join("---" for _ in b[1]) + "|")
                out.extend("| " + " | ".join(str(c) for c in r) + " |" for r in b[2])
            else:
                out.append(f"![{b[2]}]({b[1]})")
            out.append("")
        return "\n".join(out)

    def html(self, title) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
               "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
               "text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}"
               "img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
                out.extend("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
                out.append("</table>")
            else:
                out.append(f"<figure><img src='{e(b[1])}' alt='{e(b[2])}'><figcaption>{e(b[2])}</figcaption>"
                           "</figure>")
        out.append("</body></html>")
        return "\n".join(out)


# ---- the report -------------------------------------------------------------------------------------------
COMPARE_FILE = "compare.json"  # written by ``certlab demo`` (certlab.demo) into the sweep folder
RECIPE_NAMES = {"standard": "standard", "pgd": "PGD (AT)", "ibp": "IBP (certified)",
                "crown-ibp": "CROWN-IBP (certified)"}


def read_compare(sweep_dir) -> dict:
    """{dataset: [evaluation rows]} from ``sweep_dir/compare.json`` ({} when absent or unreadable)."""
    try:
        with open(os.path.join(sweep_dir, COMPARE_FILE), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict):
        return {}
    return {ds: v["rows"] for ds, v in d.items() if isinstance(v, dict) and isinstance(v.get("rows"), list)
            and all(isinstance(r, dict) for r in v["rows"]) and v["rows"]}


def _compare_section(doc, compare):
    doc.h(2, "Standard vs PGD vs IBP training on built-in data")
    doc.p("The first part of certlab demo: one small model per training method on each dataset, each evaluated on "
          "its test set (errors in %). Robust error: the evaluation attack (APGD-CE for the balls, the exact line "
          "search for segment sets), a lower bound on the true robust error; certified error: an upper bound on it, "
          "by each relaxation named.")
    for ds, rows in compare.items():
        methods = []
        for r in rows:
            methods += [m for m in (r.get("certified_error") or {}) if m not in methods]
        r0 = rows[0]
        doc.h(3, f"{ds} ({r0.get('norm', '')} ε = {_num(r0.get('eps'))}, {r0.get('model', '')}, "
                 f"{r0.get('n', '?')} test samples)")
        pct = lambda v: "—" if not _is_number(v) else f"{100 * v:.1f}"  # noqa: E731
        doc.table(["training", "standard err %", "robust err %"] +
                  [f"certified err % ({RELAX_NAMES.get(m, m)})" for m in methods] + ["unstable ReLUs / sample"],
                  [[RECIPE_NAMES.get(r.get("name"), str(r.get("name"))), pct(r.get("clean_error")),
                    pct(r.get("robust_error"))] + [pct((r.get("certified_error") or {}).get(m)) for m in methods] +
                   ["—" if not _is_number(r.get("unstable_relus")) else f"{r['unstable_relus']:.1f}"] for r in rows])

def _experiment_section(doc, exp, cells_all, fig_dir, rel):
    name, spec = exp["name"], exp["spec"]
    doc.h(2, f"Experiment {name}")
    if spec.get("description"):
        doc.p(" ".join(str(spec["description"]).split()))
    counts = {}
    for c in cells_all:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    cpu = sum((c["metrics"].get("time_train_s") or 0) + (c["metrics"].get("time_eval_s") or 0) for c in cells_all)
    doc.p(f"Cells: {len(cells_all)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); "
          f"summed run time of the finished cells {cpu / 60:.1f} min." + (f" Budget: {spec['budget']}." if spec.get("budget")
                                                                  else ""))
    failed = [c for c in cells_all if c["status"] == "failed"]
    if failed:
        doc.table(["failed cell", "params", "error (last line)"],
                  [[c["id"], _panel_name(sorted(c["params"].items())),
                    (c["error"] or "").strip().splitlines()[-1][:160] if c["error"] else ""] for c in failed[:20]])
    cells = [c for c in cells_all if c["status"] == "finished"]
    if not cells:
        doc.p("No finished cells yet.")
        return
    knobs, t_panels = tradeoff_axes(spec, cells)
    if knobs:  # a trade-off study: one curve per method through its own knob
        points = tradeoff_points(cells, knobs, t_panels)
        for panel in sorted({k[0] for k in points}, key=str):
            pname = _panel_name(panel)
            if pname:
                doc.h(3, pname)
            _tradeoff_panel(doc, points, panel, fig_dir, rel, _slug(f"{name}-{pname}"), f"{name} {pname}".strip())
        return
    x, panels = split_axes(spec, cells)
    agg = aggregate(cells, x, panels)
    for panel in sorted({k[0] for k in agg}, key=str):
        pname = _panel_name(panel)
        if pname:
            doc.h(3, pname)
        xs = sorted({k[2] for k in agg if k[0] == panel}, key=lambda v: (v is None, v))
        has_acr = any(v.get("acr.train", (None,))[0] is not None for k, v in agg.items() if k[0] == panel)
        header = ([AXIS_LABELS.get(x, x)] if x else []) + \
            ["method", "seeds", "standard err %", "robust err %", "certified err % (train relax.)"] + \
            (["ACR % of ε"] if has_acr else []) + ["unstable ReLUs / sample"]
        rows = []
        for xv in xs:
            for mth in _order({k[1] for k in agg if k[0] == panel and k[2] == xv}):
                v = agg[(panel, mth, xv)]
                rows.append(([xv] if x else []) + [mth, len(v["_seeds"]), fmt(v.get("clean_error")),
                                                   fmt(v.get("robust_error")), fmt(v.get("certified_error.train"))] +
                            ([fmt(v.get("acr.train"))] if has_acr else []) +
                            [fmt(v.get("unstable_relus"), False)])
        doc.table(header, rows)
        if not has_acr:
            doc.p("No ACR column: these cells did not measure the average certified radius (set eval_acr: true in "
                  "the experiment's base config to add it).")
        slug = _slug(f"{name}-{pname}")
        full = f"{name} {pname}".strip()
        if x and len(xs) > 1:
            fname = f"{slug}-vs-{_slug(x)}.png"
            figure_vs_x(agg, panel, x, MAIN_METRICS, os.path.join(fig_dir, fname),
                        f"{full}: error vs {AXIS_LABELS.get(x, x)}")
            doc.img(f"{rel}/{fname}", f"error vs {AXIS_LABELS.get(x, x)} ({full}); mean ± s.e. over seeds")
            for key, what in (("clean_error", "Standard error"), ("robust_error", "Robust error")):
                rows_g = gap_rows(agg, panel, key)
                if rows_g:
                    s = trend_sentence(rows_g, what, AXIS_LABELS.get(x, x), short=x)
                    if s:
                        doc.p(s)
        note = identical_note(agg, panel, x)
        if note:
            doc.p(note)
        _relaxation_table(doc, agg, panel, xs, x)
        points = tradeoff_points([c for c in cells if tuple((p, c["params"].get(p)) for p in panels) == panel],
                                 (x,) if x else (), ())
        fname = f"{slug}-tradeoff.png"
        acr_key = tradeoff_metrics(points, ())[0]
        if acr_key and figure_tradeoff(points, (), os.path.join(fig_dir, fname), f"{full}: clean accuracy vs ACR",
                                       "acr", f"ACR by {_metric_name(acr_key)} radii (% of ε)"):
            doc.img(f"{rel}/{fname}", f"trade-off: clean accuracy vs ACR ({full}); labels = "
                                      f"{AXIS_LABELS.get(x, x) if x else ''}")
        fname = f"{slug}-unstable.png"
        if figure_unstable(cells, panel, panels, x, os.path.join(fig_dir, fname),
                           f"{full}: unstable ReLUs over training"):
            doc.img(f"{rel}/{fname}", f"unstable ReLUs per sample over training, on the validation samples ({full})")


def _relaxation_table(doc, agg, panel, xs, x):
    relaxed = sorted({k[1] for k in agg if k[0] == panel and k[1] not in ("AT", "TRADES", "standard")})
    if len(relaxed) < 2:
        return
    diag = sorted({m for k, v in agg.items() if k[0] == panel for m in v if _DIAG.search(m)})
    cert_methods = sorted({m[len("certified_error."):] for k, v in agg.items() if k[0] == panel for m in v
                           if m.startswith("certified_error.") and m not in ("certified_error.train",
                                                                              "certified_error.best")})
    for xv in xs:
        header = ["relaxation", "standard err %", "robust err %", "cert. err (own relax.) %"] + \
                 [f"cert. {RELAX_NAMES.get(m, m)} %" for m in cert_methods] + [d[len("diag.own."):] for d in diag]
        rows = []
        for mth in relaxed:
            v = agg.get((panel, mth, xv))
            if not v:
                continue
            rows.append([mth, fmt(v.get("clean_error")), fmt(v.get("robust_error")),
                         fmt(v.get("certified_error.train"))] +
                        [fmt(v.get(f"certified_error.{m}")) for m in cert_methods] +
                        [fmt(v.get(d), False) for d in diag])
        if not rows:  # no finished certified-training cell at this value yet
            continue
        doc.p("Per-relaxation table" + (f" at {AXIS_LABELS.get(x, x)} = {xv}" if x else "") +
              " (certified error by each evaluation method, %).")
        doc.table(header, rows)


def write_report(sweep_dir, out_dir=None) -> str:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` for the sweep in ``sweep_dir`` into ``out_dir``
    (default ``sweep_dir/report``); returns the path of report.md. Reads only the database and, when ``certlab demo``
    left one there, ``sweep_dir/compare.json``."""
    sweep_dir = os.fspath(sweep_dir)
    out_dir = os.fspath(out_dir) if out_dir else os.path.join(sweep_dir, "report")
    with Store(sweep_dir, readonly=True) as st:
        exps = st.experiments()
        if not exps:
            raise CertlabError(f"the results database in {sweep_dir} has no experiments")
        per_exp = [(e, st.cells(e["name"])) for e in exps]
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    doc = Doc()
    title = "certlab report: " + ", ".join(e["name"] for e in exps)
    doc.h(1, title)
    doc.p(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from "
          f"{os.path.relpath(os.path.join(sweep_dir, 'results.sqlite'), out_dir)} (relative to this report). Errors in %, mean ± standard error over seeds (s.e. = std/√n; no ± with one seed). "
          f"Robust error: the attack ensemble of the cell's evaluation (exact line search for segment sets, "
          f"APGD for balls); certified error with the training relaxation unless stated (for AT / standard rows: "
          f"the relaxation named in the cell's config, CROWN in the shipped study files).")
    compare = read_compare(sweep_dir)
    if compare:
        _compare_section(doc, compare)
    for exp, cells in per_exp:
        _experiment_section(doc, exp, cells, fig_dir, "figures")
    md = os.path.join(out_dir, "report.md")
    write_text(md, doc.markdown())
    write_text(os.path.join(out_dir, "report.html"), doc.html(title))
    return md
