"""certlab.runtime: the memory settings of the certlab command, and the lazy package import they depend on."""

import json
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _run(code: str, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "CERTLAB_TUNE_MEMORY")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_certlab_does_not_load_torch_until_a_name_is_used():
    r = _run(
        "import sys, json, certlab\n"
        "before = 'torch' in sys.modules\n"
        "ball = certlab.LinfBall(0.1)\n"
        "print(json.dumps({'before': before, 'after': 'torch' in sys.modules, 'ball': type(ball).__name__,\n"
        "  'callable_bounds': callable(certlab.bounds), 'methods': list(certlab.METHODS),\n"
        "  'nn': certlab.nn.Normalize.__name__, 'dir': 'LinfBall' in dir(certlab)}))"
    )
    assert r == {"before": False, "after": True, "ball": "LinfBall", "callable_bounds": True,
                 "methods": ["ibp", "hbox", "deepz", "fastlin", "crown", "crown-ibp", "alpha-crown"],
                 "nn": "Normalize", "dir": True}


def test_unknown_attribute_still_raises():
    r = _run("import json, certlab\ntry:\n    certlab.no_such_name\n    print(json.dumps({'raised': False}))\n"
             "except AttributeError as e:\n    print(json.dumps({'raised': 'no_such_name' in str(e)}))")
    assert r == {"raised": True}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the settings apply on Linux only")
def test_tune_before_torch_sets_huge_pages_for_torch_and_children():
    r = _run(
        "import json, os, subprocess, sys\n"
        "from certlab import runtime\n"
        "rep = runtime.tune()\n"
        "again = runtime.tune()\n"
        "import torch\n"
        "keep = [torch.empty(3 << 20) for _ in range(5)]  # 12 MB each: page-aligned (and madvised) when torch read it\n"
        "aligned = all(t.data_ptr() % 4096 == 0 for t in keep)\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"THP_MEM_ALLOC_ENABLE\"))'],\n"
        "                       capture_output=True, text=True).stdout.strip()\n"
        "print(json.dumps({'rep': rep, 'same': again is rep, 'child': child, 'aligned': aligned}))"
    )
    assert r["rep"]["huge_pages"] is True
    assert r["same"] is True
    assert r["aligned"] is True  # torch's allocator saw the variable
    assert r["child"] == "1"  # sweep workers inherit it
    try:
        import ctypes
        has_glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        has_glibc = False
    assert r["rep"]["malloc"] is has_glibc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the settings apply on Linux only")
def test_tune_after_torch_says_huge_pages_are_too_late_and_opt_out_does_nothing():
    late = _run("import json, torch\nfrom certlab import runtime\nrep = runtime.tune()\n"
                "keep = [torch.empty(3 << 20) for _ in range(5)]\n"
                "print(json.dumps(dict(rep, aligned=all(t.data_ptr() % 4096 == 0 for t in keep))))")
    assert late["huge_pages"] is False and "torch was imported first" in late["reason"]
    assert late["aligned"] is False  # the default allocator: the control for the alignment check above
    off = _run("import json, os\nfrom certlab import runtime\n"
               "print(json.dumps(dict(runtime.tune(), env=os.environ.get('THP_MEM_ALLOC_ENABLE'))))",
               CERTLAB_TUNE_MEMORY="0")
    assert off == {"huge_pages": False, "malloc": False, "reason": "CERTLAB_TUNE_MEMORY=0", "env": None}
    # the user's own choice is kept
    mine = _run("import json, os\nfrom certlab import runtime\n"
                "print(json.dumps(dict(runtime.tune(), env=os.environ.get('THP_MEM_ALLOC_ENABLE'))))",
                THP_MEM_ALLOC_ENABLE="0")
    assert mine["huge_pages"] is False and mine["env"] == "0"
    # the benchmark scripts' switch
    ab = _run("import json, sys\nfrom certlab import runtime\n"
              "print(json.dumps(dict(runtime.tune_for_script(['x', '--no-tune']), done=runtime._done)))")
    assert ab == {"huge_pages": False, "malloc": False, "reason": "--no-tune", "done": None}


def test_certlab_command_applies_the_settings_before_torch_loads():
    # the console script's code path: certlab.cli.main() with a command that imports torch
    r = _run(
        "import json, sys, io, contextlib\n"
        "from certlab import cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        cli.main(['--version'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "from certlab import runtime\n"
        "print(json.dumps({'tuned': runtime._done, 'torch': 'torch' in sys.modules}))"
    )
    assert r["tuned"] is not None
    if sys.platform.startswith("linux"):
        assert r["tuned"]["huge_pages"] is True  # torch was not loaded before main() ran
