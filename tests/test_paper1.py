"""Paper 1 (De Bartolomeis et al. 2023): the threat set B_{ε,k} as the paper builds it (k random orthonormal
directions, one nested family) is the default, and the study tables name its methods as the paper does."""

import pytest
import torch
import yaml

from certlab import data as cdata
from certlab.data.directions import orthonormal
from certlab.errors import InputError
from certlab.experiments import report
from certlab.train.config import TrainConfig
from certlab.train.threats import ThreatMaker


@pytest.mark.parametrize("shape", [(10,), (1, 28, 28), (3,)])
def test_orthonormal_directions_are_nested_in_k(shape):
    n = 1
    for s in shape:
        n *= s
    ks = [k for k in (1, 2, 3, 5, 10) if k <= n]
    family = {k: orthonormal(shape, k, seed=7, dtype=torch.float64) for k in ks}
    for k in ks:
        v = family[k].reshape(k, -1)
        assert v.shape == (k, n)
        assert torch.allclose(v @ v.T, torch.eye(k, dtype=torch.float64), atol=1e-12)   # orthonormal rows
        for k2 in ks:
            if k2 > k:  # the directions for k are exactly the first k for any larger k (same seed)
                assert torch.equal(family[k2][:k], family[k])
    # a single randn(k, n) call is not nested for every n (its tail is filled differently): the drawn
    # family must not depend on k through that; the seed still matters
    assert not torch.allclose(orthonormal(shape, 1, seed=8, dtype=torch.float64), family[1])
    with pytest.raises(InputError, match="do not exist"):
        orthonormal(shape, n + 1, seed=0)


def test_nested_directions_give_nested_segment_sets():
    """A point of B_{ε,k} is a point of B_{ε,k+1}: the support along a fixed vector a, max_j |a·v_j| ε, never
    shrinks as k grows (checked on random vectors), and on spheres the default maker uses these shared directions."""
    ds = cdata.load("spheres", "train", d=10, n=32, margin=20.0, seed=0)
    info = ds.info
    dirs = {k: ThreatMaker("segments", "spheres", info, k=k, seed=3).directions(ds.x) for k in (1, 3, 5, 10)}
    a = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    prev = None
    for k in (1, 3, 5, 10):
        assert dirs[k].shape == (k, 10)
        assert torch.equal(dirs[k], dirs[10][:k])
        support = (a @ dirs[k].T).abs().amax(1)
        if prev is not None:
            assert (support >= prev - 1e-6).all()  # (float32 matmuls of different shapes round differently)
        prev = support
    # the k = d family is an orthonormal basis: some direction then has |cos| >= 1/sqrt(d) with the radial one
    radial = ds.x / ds.x.norm(dim=1, keepdim=True)
    assert ((radial @ dirs[10].T).abs().amax(1) >= 10 ** -0.5 - 1e-6).all()
    # the old radial construction stays available by name
    sig = ThreatMaker("segments", "spheres", info, k=3, seed=3, dirs="signal").directions(ds.x)
    assert sig.shape == (32, 3, 10) and torch.allclose(sig[:, 0], radial, atol=1e-5)


def test_default_segment_dirs_is_random_and_documented():
    assert TrainConfig().segment_dirs == "random"
    assert TrainConfig.from_dict({"segment_dirs": "signal"}).segment_dirs == "signal"
    from certlab.train.cli import HELP
    assert "random" in HELP["segment_dirs"] and "signal" in HELP["segment_dirs"]


@pytest.mark.parametrize("config,label", [
    ({"objective": "pgd", "relaxation": "crown"}, "AT"),
    ({"objective": "certified", "relaxation": "ibp"}, "IBP"),
    ({"objective": "certified", "relaxation": "ibp", "ibp_init": False, "fast_ibp_reg": False}, "IBP"),
    ({"objective": "certified", "relaxation": "ibp", "ibp_init": True, "fast_ibp_reg": True}, "Fast-IBP"),
    ({"objective": "certified", "relaxation": "ibp", "ibp_init": True}, "Fast-IBP"),
    ({"objective": "certified", "relaxation": "ibp", "fast_ibp_reg": True}, "Fast-IBP"),
    ({"objective": "certified", "relaxation": "crown-ibp", "ibp_init": True}, "CROWN-IBP"),
    ({"objective": "certified", "relaxation": "fastlin"}, "Fast-Lin (COAP bound)"),
    ({"objective": "adaptive", "relaxation": "ibp", "ibp_init": True}, "ACERT (IBP)"),
])
def test_method_labels_separate_ibp_from_fast_ibp(config, label):
    assert report.method_label(config) == label


def test_recipe_keys_zipped_with_the_method_are_not_panels():
    """A study whose methods carry their own recipes (epochs, lr, ...) zipped with objective/relaxation keeps one
    table per threat model with the methods as columns: the recipe keys are neither the x axis nor panels."""
    spec = {"zip": [{"norm": ["linf", "linf", "l2"], "eps": [0.1, 0.2, 0.75]},
                    {"objective": ["pgd", "certified", "certified"], "relaxation": ["crown", "ibp", "ibp"],
                     "epochs": [100, 200, 70], "lr": [1e-3, 5e-4, 5e-4], "ibp_init": [False, False, True]}],
            "grid": {"seed": [0, 1, 2]}}
    cells = []
    for norm, eps in (("linf", 0.1), ("linf", 0.2), ("l2", 0.75)):
        for obj, rel, ep, lr, init in zip(*[spec["zip"][1][k] for k in ("objective", "relaxation", "epochs", "lr",
                                                                          "ibp_init")]):
            cells.append({"params": {"norm": norm, "eps": eps, "objective": obj, "relaxation": rel, "epochs": ep,
                                     "lr": lr, "ibp_init": init, "seed": 0}})
    x, panels = report.split_axes(spec, cells)
    assert x == "eps" and panels == ["norm"]


def test_study1_files_use_the_papers_set_and_budgets():
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    assert not os.path.exists(os.path.join(root, "study1_spheres_k_random_cpu.yaml"))
    for name in ("study1_spheres_k.yaml", "study1_spheres_k_cpu.yaml"):
        doc = next(yaml.safe_load_all(open(os.path.join(root, name))))   # the first document: the paper's set
        assert "segment_dirs" not in doc["base"] and doc["base"]["norm"] == "segments"
        assert TrainConfig.from_dict(doc["base"]).segment_dirs == "random"
    docs = list(yaml.safe_load_all(open(os.path.join(root, "study1_mnist.yaml"))))
    budgets = set()
    labels = set()
    for d in docs:
        for g in d.get("zip", []):
            if "eps" in g:
                budgets |= set(zip(g["norm"], g["eps"]))
            if "objective" in g:
                n = len(g["objective"])
                for i in range(n):
                    cfg = {**d["base"], **{k: v[i] for k, v in g.items()}}
                    TrainConfig.from_dict(cfg)  # every cell's recipe is a valid config
                    labels.add(report.method_label(cfg))
        assert d["base"]["data"]["n"] == 5000 and d["base"]["eval_n"] >= 2000
        assert set(d["base"]["eval_attacks"]) == {"apgd-ce", "apgd-t"} and "crown" in d["base"]["eval_certify"]
        assert len(d["grid"]["seed"]) >= 3
    assert budgets == {("linf", 0.1), ("linf", 0.2), ("linf", 0.3), ("linf", 0.4),
                       ("l2", 0.5), ("l2", 0.75), ("l2", 1.0), ("l2", 1.25)}
    assert labels == {"AT", "IBP", "Fast-IBP", "CROWN-IBP", "Fast-Lin (COAP bound)"}


def test_study1_mnist_cpu_cut_keeps_the_full_files_recipes():
    """The CPU cut is a subset of the full file's cells up to the model: same recipes per method, the protocol's
    seeds and evaluation, Table 1's budgets."""
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    full = next(yaml.safe_load_all(open(os.path.join(root, "study1_mnist.yaml"))))
    cut = next(yaml.safe_load_all(open(os.path.join(root, "study1_mnist_cpu.yaml"))))

    def recipes(doc):
        g = next(g for g in doc["zip"] if "objective" in g)
        out = {}
        for i in range(len(g["objective"])):
            cfg = {k: v[i] for k, v in g.items()}
            out[report.method_label(cfg)] = cfg
        return out

    full_r, cut_r = recipes(full), recipes(cut)
    assert set(cut_r) == {"AT", "IBP", "Fast-IBP"}
    for label, cfg in cut_r.items():
        assert cfg == full_r[label]
    g = next(g for g in cut["zip"] if "eps" in g)
    assert set(zip(g["norm"], g["eps"])) == {("linf", 0.1), ("l2", 0.75)}
    assert len(cut["grid"]["seed"]) >= 3 and cut["base"]["eval_n"] >= 2000 and cut["base"]["data"]["n"] == 5000
    assert {k: v for k, v in cut["base"].items() if k not in ("model", "val_n")} == \
        {k: v for k, v in full["base"].items() if k not in ("model", "val_n")}
