"""VNN-LIB properties (the VNN-COMP format): a writer for ℓ∞ robustness of one sample and a reader for the
properties VNN-COMP uses.

Writer. The file declares the flattened input ``X_0 … X_{n−1}`` (row-major order of the ONNX input) and the logits
``Y_0 … Y_{K−1}``, bounds every input to ``[max(x_i − ε, lo), min(x_i + ε, hi)]`` and asserts the *unsafe* outputs:
some other class j reaches the label's logit, ``(or (and (>= Y_j Y_y)) …)``. A verifier answering "unsat" proves
robustness; "sat" comes with a counterexample.

Reader (:func:`read_property`). Top-level ``declare-const`` (``X_i``/``Y_j``, Real) and ``assert`` of formulas built
with ``and``/``or`` from comparisons ``<=``, ``>=``, ``<``, ``>``, ``=`` of linear terms (numbers, variables, ``+``,
``-``, ``*`` by a constant). Every assert holds at once; the conjunction is put in disjunctive normal form, and each
term must bound inputs one at a time (``X_i ≤ c``, ``c ≥ X_i``, …) and may constrain the outputs linearly. Terms
are grouped by their input box into a :class:`certlab.verify.property.Property`. Strict comparisons are read as
non-strict (a superset of the unsafe set, so "unsat" stays sound). Anything else is an error naming the construct
and its line.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from certlab.errors import CertlabError
from certlab.fileio import write_text
from certlab.verify.property import Property, Region


def _fmt(v: float) -> str:
    return repr(float(v))


def vnnlib_text(x, y: int, eps: float, num_classes: int, domain=(0.0, 1.0)) -> str:
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    eps = float(eps)
    if not eps >= 0 or not np.isfinite(eps):
        raise CertlabError(f"eps must be a finite number >= 0, got {eps}")
    if not 0 <= int(y) < num_classes or num_classes < 2:
        raise CertlabError(f"label {y} must lie in [0, {num_classes - 1}] (num_classes >= 2)")
    lo, hi = x - eps, x + eps
    if domain is not None:
        lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
    lines = [f"; certlab robustness property: label {int(y)}, l_inf eps {eps!r}, {x.size} inputs, {num_classes} outputs"]
    lines += [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines.append("; input box")
    for i in range(x.size):
        lines.append(f"(assert (<= X_{i} {_fmt(hi[i])}))")
        lines.append(f"(assert (>= X_{i} {_fmt(lo[i])}))")
    lines.append("; unsafe: another class scores at least as high as the label")
    others = [j for j in range(num_classes) if j != int(y)]
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{j} Y_{int(y)}))" for j in others]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write_vnnlib(path, x, y: int, eps: float, num_classes: int, domain=(0.0, 1.0)) -> None:
    """Write the property for sample x (any shape; flattened row-major) with label y (atomic)."""
    write_text(path, vnnlib_text(x, y, eps, num_classes, domain))


MAX_TERMS = 200000  # disjunctive normal form size limit


def _tokens(text, path):
    """[(token, line)]: parentheses and atoms, ``;`` comments dropped."""
    out = []
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0]
        for t in re.findall(r"\(|\)|[^\s()]+", line):
            out.append((t, ln))
    return out


def _parse(tokens, path):
    """Nested lists of (atom, line); each list also records its opening line as ``list.line``."""
    stack, top = [], []
    for t, ln in tokens:
        if t == "(":
            new = _SList()
            new.line = ln
            (stack[-1] if stack else top).append(new)
            stack.append(new)
        elif t == ")":
            if not stack:
                raise CertlabError(f"{path}:{ln}: unbalanced ')'")
            stack.pop()
        else:
            (stack[-1] if stack else top).append((t, ln))
    if stack:
        raise CertlabError(f"{path}:{stack[-1].line}: '(' is never closed")
    return top


class _SList(list):
    line = 0


def _line(e):
    return e.line if isinstance(e, _SList) else e[1]


def _head(e):
    return e[0][0] if isinstance(e, _SList) and e and not isinstance(e[0], _SList) else None


class _Reader:
    def __init__(self, path):
        self.path = path
        self.vars = {}  # name -> ("X"|"Y", index)

    def err(self, e, msg):
        return CertlabError(f"{self.path}:{_line(e)}: {msg}")

    def term(self, e):
        """({(kind, index): coef}, const) of a linear term."""
        if not isinstance(e, _SList):
            t = e[0]
            if t in self.vars:
                return {self.vars[t]: 1.0}, 0.0
            try:
                return {}, float(t)
            except ValueError:
                raise self.err(e, f"unknown symbol '{t}' (declare it with declare-const)") from None
        op = _head(e)
        args = [self.term(a) for a in e[1:]]
        if op == "+" and args:
            return _lin_sum(args, [1.0] * len(args))
        if op == "-" and len(args) == 1:
            return _lin_sum(args, [-1.0])
        if op == "-" and args:
            return _lin_sum(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*" and args:
            lin = [c for c, _ in args if c]
            if len(lin) > 1:
                raise self.err(e, "unsupported construct '*' of two variables (not linear)")
            k = float(np.prod([k for c, k in args if not c]))
            if not lin:
                return {}, k
            c, k0 = next((c, k0) for c, k0 in args if c)
            return {v: a * k for v, a in c.items()}, k0 * k
        raise self.err(e, f"unsupported construct '({op}' in a term" if op else "unsupported term")

    def formula(self, e):
        """Disjunctive normal form: a list of terms, each a list of (coef dict, const, line): Σ coef·v + const ≤ 0."""
        op = _head(e)
        if op in ("and", "or"):
            parts = [self.formula(a) for a in e[1:]]
            if op == "or":
                out = [t for p in parts for t in p]
            else:
                out = [[]]
                for p in parts:
                    out = [a + b for a in out for b in p]
                    if len(out) > MAX_TERMS:
                        raise self.err(e, f"the formula has more than {MAX_TERMS} disjuncts in normal form")
            return out
        if op in ("<=", ">=", "<", ">", "=") and len(e) == 3:
            (ca, ka), (cb, kb) = self.term(e[1]), self.term(e[2])
            diff = _lin_sum([(ca, ka), (cb, kb)], [1.0, -1.0])  # a − b
            neg = _lin_sum([diff], [-1.0])
            ln = _line(e)
            if op in ("<=", "<"):
                return [[(*diff, ln)]]
            if op in (">=", ">"):
                return [[(*neg, ln)]]
            return [[(*diff, ln), (*neg, ln)]]
        if op is None:
            raise self.err(e, "unsupported construct: a bare atom where a formula is expected")
        raise self.err(e, f"unsupported construct '({op}'")

    def read(self, text):
        top = _parse(_tokens(text, self.path), self.path)
        asserts = []
        for e in top:
            op = _head(e)
            if op == "declare-const":
                if len(e) != 3 or isinstance(e[1], _SList) or isinstance(e[2], _SList) or e[2][0] != "Real":
                    raise self.err(e, "declare-const must read (declare-const NAME Real)")
                m = re.fullmatch(r"([XY])_(\d+)", e[1][0])
                if not m:
                    raise self.err(e, f"unsupported variable name '{e[1][0]}' (inputs X_i, outputs Y_j)")
                self.vars[e[1][0]] = (m.group(1), int(m.group(2)))
            elif op == "assert":
                if len(e) != 2:
                    raise self.err(e, "assert takes one formula")
                asserts.append(e[1])
            elif op in ("set-logic", "check-sat", "get-model", "exit", "set-info", "set-option"):
                continue
            else:
                raise self.err(e, f"unsupported construct '({op}'" if op else "unsupported top-level item")
        terms = [[]]
        for a in asserts:
            f = self.formula(a)
            terms = [t + u for t in terms for u in f]
            if len(terms) > MAX_TERMS:
                raise self.err(a, f"the property has more than {MAX_TERMS} disjuncts in normal form")
        n = _count(self.vars, "X")
        K = _count(self.vars, "Y")
        if n == 0 or K == 0:
            raise CertlabError(f"{self.path}: declares {n} inputs X_i and {K} outputs Y_j; both are needed")
        regions = {}
        for t in terms:
            lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
            rows, ds = [], []
            for coef, const, ln in t:
                kinds = {k for k, _ in coef}
                if kinds == {"X"}:
                    if len(coef) > 1:
                        raise CertlabError(f"{self.path}:{ln}: unsupported construct: a constraint on several inputs")
                    (_, i), a = next(iter(coef.items()))
                    if a > 0:
                        hi[i] = min(hi[i], -const / a)
                    elif a < 0:
                        lo[i] = max(lo[i], -const / a)
                elif kinds == {"Y"}:
                    row = np.zeros(K)
                    for (_, j), a in coef.items():
                        row[j] += a
                    rows.append(row)
                    ds.append(-const)
                elif not kinds:
                    if const > 0:  # a false constant comparison: the term cannot hold
                        break
                else:
                    raise CertlabError(f"{self.path}:{ln}: unsupported construct: a constraint mixing inputs and "
                                       "outputs")
            else:
                if (lo > hi).any():
                    continue  # an empty box: the term cannot hold
                key = (lo.tobytes(), hi.tobytes())
                if key not in regions:
                    regions[key] = (lo, hi, [])
                regions[key][2].append((np.array(rows).reshape(len(rows), K), np.array(ds, dtype=np.float64)))
        try:
            return Property(n, K, [Region(lo, hi, c) for lo, hi, c in regions.values()])
        except CertlabError as e:
            raise CertlabError(f"{self.path}: {e}") from None


def _count(vars_, kind):
    idx = sorted(i for k, i in vars_.values() if k == kind)
    if idx != list(range(len(idx))):
        raise CertlabError(f"{kind} variables must be numbered 0..n-1, got {idx[:5]}...")
    return len(idx)


def _lin_sum(args, signs):
    coef, const = {}, 0.0
    for (c, k), s in zip(args, signs):
        for v, a in c.items():
            coef[v] = coef.get(v, 0.0) + s * a
        const += s * k
    return {v: a for v, a in coef.items() if a != 0.0}, const


def read_property(path) -> Property:
    """The :class:`~certlab.verify.property.Property` in the VNN-LIB file at ``path`` (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CertlabError(f"VNN-LIB file not found: {path}")
    try:
        if path.endswith(".gz"):
            import gzip

            with gzip.open(path, "rt") as f:
                text = f.read()
        else:
            with open(path) as f:
                text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CertlabError(f"{path} is not a readable text file: {e}") from None
    return _Reader(path).read(text)


def read_vnnlib(path):
    """(lo [n], hi [n], label, others) of a robustness property (one box, a disjunction of ``f_y ≤ f_j``)."""
    prop = read_property(path)
    if len(prop.regions) != 1:
        raise CertlabError(f"{path}: expected one input box, found {len(prop.regions)}")
    r = prop.regions[0]
    labels, others = set(), []
    for C, d in r.conjunctions:
        if C.shape[0] != 1:
            raise CertlabError(f"{path}: expected a disjunction of (>= Y_j Y_y) for one label y")
        pos, neg = np.nonzero(C[0] > 0)[0], np.nonzero(C[0] < 0)[0]
        if len(pos) != 1 or len(neg) != 1 or d[0] != 0 or C[0, pos[0]] != -C[0, neg[0]]:
            raise CertlabError(f"{path}: expected a disjunction of (>= Y_j Y_y) for one label y")
        labels.add(int(pos[0]))
        others.append(int(neg[0]))
    if len(labels) != 1:
        raise CertlabError(f"{path}: expected (>= Y_j Y_y) for one label y, found labels {sorted(labels)}")
    return r.lower, r.upper, labels.pop(), sorted(others)
