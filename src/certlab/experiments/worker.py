"""Run one cell in its own process: ``python .../certlab/experiments/worker.py JOB.json``.

This file imports only the standard library and ``certlab.runtime`` (which applies the memory settings before the
cell function imports torch), so a worker costs a bare interpreter start.

The job file holds ``{cell_id, cell_fn: "module:function", config, run_dir, threads}``. The worker calls
``function(config, run_dir)`` and writes ``run_dir/cell_result.json`` atomically:
``{"cell_id", "ok": true, "result"}`` or ``{"cell_id", "ok": false, "error": traceback}``. The sweep process reads
that file when the worker exits and records it in the database (the worker never touches the database), so a
kill at any moment leaves either no result file or a complete one.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

RESULT_NAME = "cell_result.json"


def resolve(cell_fn: str):
    """``"package.module:function"`` -> the function."""
    mod, _, fn = cell_fn.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cell function {cell_fn!r} cannot be imported: {e}") from None


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temp file in the same folder, fsync, then ``os.replace``."""
    from certlab.fileio import write_text  # standard library only

    write_text(path, json.dumps(obj, sort_keys=True, default=_jsonable), fsync=True)


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_result(run_dir: str, cell_id: str):
    """The complete result file of ``cell_id`` in ``run_dir``, or None (missing, torn or another cell's)."""
    path = os.path.join(run_dir, RESULT_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("cell_id") != cell_id or "ok" not in data:
        return None
    return data


def execute(job: dict) -> dict:
    """Run the job in this process; write and return the result record."""
    run_dir = job["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    threads = int(job.get("threads") or 0)
    try:
        from certlab import runtime  # light: certlab imports torch lazily

        runtime.tune()  # memory settings before the cell imports torch (inherited from the sweep as well)
        fn = resolve(job["cell_fn"])
        if threads > 0 and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        result = fn(dict(job["config"]), run_dir)
        record = {"cell_id": job["cell_id"], "ok": True, "result": result}
    except Exception:  # the cell failed: record why, the sweep marks it failed and goes on
        record = {"cell_id": job["cell_id"], "ok": False, "error": traceback.format_exc()}
    write_json_atomic(os.path.join(run_dir, RESULT_NAME), record)
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # started by path: no shadowing
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    record = execute(job)
    if not record["ok"]:
        print(record["error"], file=sys.stderr)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
