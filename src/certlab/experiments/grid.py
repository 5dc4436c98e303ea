"""Experiment files: a base config and a grid, expanded into cells.

An experiment file (YAML) has the keys

    name: study1_spheres_k          # required, [A-Za-z0-9_.-]+
    description: free text           # optional
    base: {...}                      # a certlab.train.TrainConfig dict (partial: defaults fill the rest)
    grid: {key: [v1, v2, ...], ...}  # cartesian product over the keys
    zip:                             # optional: groups whose lists vary jointly (one axis per group)
      - {objective: [pgd, certified], relaxation: [crown, ibp]}
    exclude:                         # optional: drop every cell matching all key/values of one entry
      - {objective: pgd, k: 3}
    cell_fn: module:function         # optional: what runs one cell (default certlab.experiments.cell:run_cell)
    budget: text                     # optional: the CPU budget, shown in dry runs and reports
    extends: other_name              # optional: start from the base of an earlier experiment of the same file
                                     # (deep merge: this base's keys override, nested dicts merge) and, unless
                                     # given here, its cell_fn

A file may hold several experiments as YAML documents separated by ``---``.

Keys may be dotted paths into nested dicts (``data.margin`` sets ``base["data"]["margin"]``). The number of
cells is ∏ |grid[key]| × ∏ len(zip group) minus the excluded ones. A cell's config is the base with the cell's
values written in; its id is the first 16 hex digits of SHA-256 of the canonical JSON of that config (sorted
keys, no whitespace), so the id is stable across runs, machines and the order of keys in the file.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from certlab.errors import CertlabError

DEFAULT_CELL_FN = "certlab.experiments.cell:run_cell"
_TOP_KEYS = {"name", "description", "base", "grid", "zip", "exclude", "cell_fn", "budget", "extends"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: ``id`` (stable hash), ``index`` (position in the expansion), ``params`` (the
    grid values of this cell, dotted keys) and ``config`` (the full resolved config dict)."""

    id: str
    index: int
    params: dict
    config: dict


@dataclass
class Experiment:
    name: str
    base: dict
    grid: dict = field(default_factory=dict)
    zip: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    description: str = ""
    cell_fn: str = DEFAULT_CELL_FN
    budget: str = ""
    source: str | None = None

    @property
    def axes(self) -> list:
        """Every varied key: the grid keys, then the keys of each zip group."""
        keys = list(self.grid)
        for group in self.zip:
            keys.extend(group)
        return keys

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "base": self.base, "grid": self.grid,
                "zip": self.zip, "exclude": self.exclude, "cell_fn": self.cell_fn, "budget": self.budget}

    def cells(self) -> list:
        """The expanded cells (see :func:`expand`)."""
        return expand(self)


def canonical_json(obj) -> str:
    """Canonical JSON used for hashing: sorted keys, no whitespace; floats that are whole numbers stay floats."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def cell_id(config: dict) -> str:
    """SHA-256 of the canonical JSON of ``config``, first 16 hex digits."""
    try:
        text = canonical_json(config)
    except (TypeError, ValueError) as e:
        raise CertlabError(f"cell config is not JSON-serialisable: {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_path(d: dict, key: str, value) -> None:
    """``d[a][b] = value`` for ``key = "a.b"``, creating nested dicts on the way."""
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if nxt is None:
            nxt = d[p] = {}
        elif not isinstance(nxt, dict):
            raise CertlabError(f"grid key {key!r}: {p!r} is not a dict in the base config")
        d = nxt
    d[parts[-1]] = copy.deepcopy(value)


def deep_merge(base: dict, over: dict) -> dict:
    """A copy of ``base`` with ``over`` written in; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def get_path(d: dict, key: str, default=None):
    for p in key.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _check_values(where: str, key, values) -> list:
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise CertlabError(f"{where}: key {key!r} must be a non-empty (dotted) string")
    if not isinstance(values, list) or not values:
        raise CertlabError(f"{where}: {key!r} must map to a non-empty list of values, got {values!r}")
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise CertlabError(f"{where}: {key!r} has a non-finite value {v!r}")
    return values


def from_dict(spec, source: str | None = None) -> Experiment:
    """Validate an experiment spec (a dict as read from YAML) into an :class:`Experiment`."""
    where = source or "experiment"
    if not isinstance(spec, dict):
        raise CertlabError(f"{where}: an experiment file must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise CertlabError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; valid: "
                           f"{', '.join(sorted(_TOP_KEYS))}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CertlabError(f"{where}: 'name' must be a string of letters, digits, '_', '.', '-', got {name!r}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise CertlabError(f"{where}: 'base' must be a mapping")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise CertlabError(f"{where}: 'grid' must be a mapping of key -> list of values")
    for k, v in grid.items():
        _check_values(f"{where}: grid", k, v)
    groups = spec.get("zip") or []
    if isinstance(groups, dict):
        groups = [groups]
    if not isinstance(groups, list):
        raise CertlabError(f"{where}: 'zip' must be a list of mappings")
    seen = set(grid)
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not g:
            raise CertlabError(f"{where}: zip group {i} must be a non-empty mapping of key -> list")
        lengths = {len(_check_values(f"{where}: zip group {i}", k, v)) for k, v in g.items()}
        if len(lengths) != 1:
            raise CertlabError(f"{where}: zip group {i} lists have different lengths {sorted(lengths)}")
        dup = seen & set(g)
        if dup:
            raise CertlabError(f"{where}: key(s) {', '.join(sorted(dup))} appear in more than one axis")
        seen |= set(g)
    exclude = spec.get("exclude") or []
    if not isinstance(exclude, list) or any(not isinstance(e, dict) or not e for e in exclude):
        raise CertlabError(f"{where}: 'exclude' must be a list of non-empty mappings")
    for e in exclude:
        bad = sorted(set(e) - seen)
        if bad:
            raise CertlabError(f"{where}: exclude key(s) {', '.join(bad)} are not grid or zip axes")
    cell_fn = spec.get("cell_fn") or DEFAULT_CELL_FN
    if not isinstance(cell_fn, str) or cell_fn.count(":") != 1:
        raise CertlabError(f"{where}: cell_fn must be 'module:function', got {cell_fn!r}")
    return Experiment(name=name, base=copy.deepcopy(base), grid=copy.deepcopy(grid), zip=copy.deepcopy(groups),
                      exclude=copy.deepcopy(exclude), description=str(spec.get("description") or ""),
                      cell_fn=cell_fn, budget=str(spec.get("budget") or ""), source=source)


def load_all(path) -> list:
    """Read and validate every experiment of a YAML file (several YAML documents separated by ``---`` make
    several experiments, e.g. the three parts of the demo)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except FileNotFoundError:
        raise CertlabError(f"experiment file not found: {path}") from None
    except yaml.YAMLError as e:
        raise CertlabError(f"experiment file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not docs:
        raise CertlabError(f"experiment file {path} is empty")
    exps, by_name = [], {}
    for d in docs:
        if isinstance(d, dict) and d.get("extends") is not None:
            parent = by_name.get(d["extends"])
            if parent is None:
                raise CertlabError(f"{path}: experiment {d.get('name')!r} extends {d['extends']!r}, which is not an "
                                   f"earlier experiment of this file")
            d = {**d, "base": deep_merge(parent.base, d.get("base") or {}),
                 "cell_fn": d.get("cell_fn") or parent.cell_fn}
        e = from_dict(d, source=path)
        by_name[e.name] = e
        exps.append(e)
    names = [e.name for e in exps]
    if len(set(names)) != len(names):
        raise CertlabError(f"experiment file {path} repeats an experiment name: {', '.join(names)}")
    return exps


def load(path) -> Experiment:
    """Read and validate a YAML file holding exactly one experiment."""
    exps = load_all(path)
    if len(exps) != 1:
        raise CertlabError(f"{path} holds {len(exps)} experiments; use load_all")
    return exps[0]


def _matches(params: dict, rule: dict) -> bool:
    return all(k in params and _same(params[k], v) for k, v in rule.items())


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def expand(exp: Experiment) -> list:
    """All cells of ``exp`` in a deterministic order (grid keys in file order, last key fastest; zip groups after
    the grid keys), excluded cells dropped, exact duplicates (same resolved config) kept once."""
    axes = [[(k, v) for v in vals] for k, vals in exp.grid.items()]
    for g in exp.zip:
        keys = list(g)
        axes.append([tuple((k, g[k][i]) for k in keys) for i in range(len(g[keys[0]]))])
    cells, seen = [], set()
    for combo in itertools.product(*axes):
        params = {}
        for item in combo:
            if item and isinstance(item[0], tuple):
                params.update(dict(item))
            else:
                params[item[0]] = item[1]
        if any(_matches(params, rule) for rule in exp.exclude):
            continue
        config = copy.deepcopy(exp.base)
        for k, v in params.items():
            set_path(config, k, v)
        cid = cell_id(config)
        if cid in seen:
            continue
        seen.add(cid)
        cells.append(Cell(cid, len(cells), params, config))
    return cells


def uses_train_config(exp: Experiment) -> bool:
    """Whether the cells are TrainConfig dicts (the cell functions shipped in certlab.experiments.cell)."""
    return exp.cell_fn.startswith("certlab.experiments.cell:")


def validate_configs(cells: list) -> None:
    """Check every cell config with ``certlab.train.TrainConfig.from_dict`` (when the training module exists);
    the first bad cell raises a CertlabError naming it."""
    try:
        from certlab.train import TrainConfig
    except ImportError:
        return
    for c in cells:
        try:
            TrainConfig.from_dict(copy.deepcopy(c.config))
        except CertlabError as e:
            raise CertlabError(f"cell {c.id} ({_describe(c.params)}): {e}") from None


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
