"""Run a sweep: expand an experiment, record its cells, run the missing ones, record results.

- The sweep directory ``DIR`` holds ``results.sqlite`` (see :mod:`certlab.experiments.store`), one run folder
  per cell ``DIR/runs/<cell id>/`` and, while a sweep runs, ``.sweep.lock``: one sweep per directory at a time
  (``flock``; the OS drops the lock when the sweep dies however it dies; a sweep that ends removes the file).
- Only this process writes the database. Cells run in worker processes (``--launcher local``: one
  subprocess per cell, at most ``jobs`` at once, each killed with the sweep via ``PR_SET_PDEATHSIG`` on Linux;
  ``--launcher ray``: Ray tasks). A worker writes ``cell_result.json`` in its run folder; the sweep records it.
- Resume: finished cells are skipped. Cells found ``running`` (their sweep was killed) are marked failed;
  failed cells (crashed earlier or interrupted) are run again, each a fresh attempt that resumes its training
  from its ``last.pt`` when one exists. A complete result file that a killed sweep never recorded is recorded
  without running the cell again.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

from certlab.errors import CertlabError
from certlab.experiments import grid as gridmod
from certlab.experiments.store import Store, db_path
from certlab.experiments.worker import RESULT_NAME, read_result, write_json_atomic
from certlab.progress import clock
from certlab.progress import interval as progress_interval

LAUNCHERS = ("local", "ray")
LOCK_NAME = ".sweep.lock"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


_last_line = [0.0]  # when _log last printed (time.monotonic)


def _log(progress, msg):
    if progress:
        print(msg, flush=True)
        _last_line[0] = time.monotonic()


def _status(progress, t0, total, done, running):
    """While cells run and nothing else was printed for a progress interval: one line with the counts, the elapsed
    time and an estimate of the time left (from the mean time of the cells finished so far)."""
    if not progress or time.monotonic() - _last_line[0] < progress_interval():
        return
    el = time.monotonic() - t0
    eta = clock(el / done * (total - done)) if done else "?"
    _log(progress, f"  sweep: {done}/{total} cells done, {running} running, elapsed {clock(el)}, ETA {eta}")


class _DirLock:
    """``flock`` on ``DIR/.sweep.lock``; the file is removed when the sweep ends. A sweep that locked a file another
    one removed meanwhile (it waited on the old file) locks the new file instead, so two sweeps never both hold
    one."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = None

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CertlabError(f"another certlab sweep is running in {os.path.dirname(self.path)} "
                                   f"(lock {self.path})") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by the sweep that held it: lock the current one
        self.fd = fd
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)  # while still locked: no other sweep holds this file
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _die_with_parent():  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _term_as_interrupt:
    """SIGTERM raises KeyboardInterrupt in the main thread, so workers are stopped and cells marked."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def load_experiments(exp) -> list:
    """A path (one or more YAML documents), a spec dict, an Experiment, or a list of those -> [Experiment]."""
    if isinstance(exp, (list, tuple)):
        out = []
        for e in exp:
            out.extend(load_experiments(e))
        return out
    if isinstance(exp, gridmod.Experiment):
        return [exp]
    if isinstance(exp, dict):
        return [gridmod.from_dict(exp)]
    return gridmod.load_all(exp)


def plan(experiment, out_dir) -> list:
    """``[(experiment name, cell, status)]`` for a dry run: status from an existing database in ``out_dir``
    (opened read only), else ``"new"``. Writes nothing."""
    rows = [(e.name, c) for e in load_experiments(experiment) for c in e.cells()]
    status = {}
    if os.path.exists(db_path(out_dir)):
        with Store(out_dir, readonly=True) as st:
            for _, c in rows:
                row = st.conn.execute("SELECT status FROM cells WHERE id=?", (c.id,)).fetchone()
                if row:
                    status[c.id] = row[0]
    return [(name, c, status.get(c.id, "new")) for name, c in rows]


def run_sweep(experiment, out_dir, jobs: int = 1, launcher: str = "local", address: str | None = None,
              progress: bool = True, validate: bool = True, threads: int | None = None) -> dict:
    """Run every unfinished cell of ``experiment`` (a path, spec dict, Experiment or a list of them) with results
    in ``out_dir``; all experiments' cells share one pool of ``jobs`` workers.

    Returns ``{"experiments", "cells", "finished", "failed", "ran", "skipped", "db", "ran_ok", "ran_failed"}``
    (counts over the distinct cells of these experiments); cells that failed this time stay ``failed`` in the
    database and are retried by the next sweep."""
    exps = load_experiments(experiment)
    if launcher not in LAUNCHERS:
        raise CertlabError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise CertlabError(f"--jobs must be a positive integer, got {jobs!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CertlabError(f"--threads must be a positive integer, got {threads!r}")
    ray = _import_ray() if launcher == "ray" else None
    per_exp = [(e, e.cells()) for e in exps]
    for e, cells in per_exp:
        if validate and gridmod.uses_train_config(e):
            gridmod.validate_configs(cells)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    names = ", ".join(e.name for e in exps)
    with _DirLock(out_dir), Store(out_dir) as store, _term_as_interrupt():
        new = sum(store.add_experiment(e, cells) for e, cells in per_exp)
        stale = store.recover_interrupted()
        if stale:
            _log(progress, f"{len(stale)} cell(s) left running by a killed sweep marked failed; retrying them")
        jobs_by_id = {}
        for e, cells in per_exp:
            for c in cells:
                jobs_by_id.setdefault(c.id, (e, c))
        todo = []
        for e, _ in per_exp:
            todo.extend(cid for cid in store.cell_ids(e.name, ("pending", "failed")) if cid not in todo)
        skipped = len(jobs_by_id) - len(todo)
        _log(progress, f"sweep {names}: {len(jobs_by_id)} cells ({new} new), {skipped} already finished, "
                       f"{len(todo)} to run with {jobs} job(s) [{launcher}] in {out_dir}")
        todo = _harvest(store, todo, out_dir, progress)
        jobs_list = [_job(*jobs_by_id[cid], out_dir, threads) for cid in todo]
        if launcher == "ray":
            outcome = _run_ray(ray, address, store, jobs_list, jobs, threads, progress)
        else:
            outcome = _run_local(store, jobs_list, jobs, threads, progress)
        status = dict(store.conn.execute("SELECT id, status FROM cells").fetchall())
    finished = sum(status.get(cid) == "finished" for cid in jobs_by_id)
    failed = sum(status.get(cid) == "failed" for cid in jobs_by_id)
    _log(progress, f"sweep {names}: {finished}/{len(jobs_by_id)} finished, {failed} failed")
    return {"experiments": [e.name for e in exps], "cells": len(jobs_by_id), "finished": finished, "failed": failed,
            "ran": len(jobs_list), "skipped": skipped, "db": db_path(out_dir), **outcome}


def _job(exp, cell, out_dir, threads) -> dict:
    return {"cell_id": cell.id, "cell_fn": exp.cell_fn, "config": cell.config, "params": cell.params,
            "run_dir": os.path.join(out_dir, "runs", cell.id), "threads": threads}


def _record(store, cell_id, record, progress, label, elapsed=None) -> bool:
    if record is not None and record.get("ok"):
        result = record["result"] if isinstance(record.get("result"), dict) else {"value": record.get("result")}
        store.finish(cell_id, result, result.get("history"))
        _log(progress, f"  finished {cell_id} ({label})" + (f" in {elapsed:.1f}s" if elapsed else ""))
        return True
    error = (record or {}).get("error") or "worker produced no result"
    store.fail(cell_id, error)
    _log(progress, f"  FAILED {cell_id} ({label}): {error.strip().splitlines()[-1] if error.strip() else error}")
    return False


def _harvest(store, todo, out_dir, progress) -> list:
    """Record complete results that a killed sweep left unrecorded; return the cells still to run."""
    rest = []
    for cid in todo:
        rec = read_result(os.path.join(out_dir, "runs", cid), cid)
        if rec is not None and rec.get("ok"):
            store.claim(cid)
            _record(store, cid, rec, progress, "recorded from a previous sweep's result file")
        else:
            rest.append(cid)
    return rest


def _run_local(store, jobs_list, jobs, threads, progress) -> dict:
    queue = list(jobs_list)
    running = {}  # cell id -> (Popen, job, t0, log file)
    done = failed = 0
    t_start = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        while queue or running:
            while queue and len(running) < jobs:
                job = queue.pop(0)
                os.makedirs(job["run_dir"], exist_ok=True)
                stale = os.path.join(job["run_dir"], RESULT_NAME)
                if os.path.exists(stale):
                    os.unlink(stale)
                job_path = os.path.join(job["run_dir"], "job.json")
                write_json_atomic(job_path, job)
                store.claim(job["cell_id"])
                log = open(os.path.join(job["run_dir"], "worker.log"), "ab")
                proc = subprocess.Popen([sys.executable, WORKER, job_path],
                                        stdout=log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
                running[job["cell_id"]] = (proc, job, time.time(), log)
                _log(progress, f"  started {job['cell_id']} ({_describe(job['params'])})")
            time.sleep(0.05)
            _status(progress, t_start, len(jobs_list), done + failed, len(running))
            for cid in list(running):
                proc, job, t0, log = running[cid]
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[cid]
                rec = read_result(job["run_dir"], cid)
                if rec is None:
                    rec = {"ok": False, "error": f"worker exited with code {rc} without a result; "
                                                 f"log tail: {_tail(os.path.join(job['run_dir'], 'worker.log'))}"}
                ok = _record(store, cid, rec, progress, _describe(job["params"]), time.time() - t0)
                done += ok
                failed += not ok
    finally:
        for cid, (proc, job, t0, log) in running.items():  # interrupted: stop our workers, mark their cells
            proc.kill()
            proc.wait()
            log.close()
            store.fail(cid, "interrupted: the sweep was stopped")
    return {"ran_ok": done, "ran_failed": failed}


def _tail(path, n=800) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# ---- Ray -------------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CertlabError("--launcher ray needs the optional 'ray' package (pip install 'certlab[ray]'), which "
                           "is not installed; use --launcher local") from None
    return ray


def _ray_execute(job):  # runs on a Ray worker: same code path as a local worker process
    from certlab.experiments.worker import execute
    return execute(job)


def _run_ray(ray, address, store, jobs_list, jobs, threads, progress) -> dict:
    """Submit every cell as a Ray task (``num_cpus=threads``), at most ``jobs`` in flight; record results as
    they come. Run folders must be on a file system the Ray workers share with this process."""
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:  # a local instance on this machine
        ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    remote = ray.remote(num_cpus=threads, max_retries=0)(_ray_execute)
    queue, inflight, done, failed = list(jobs_list), {}, 0, 0
    t_start = time.monotonic()
    try:
        while queue or inflight:
            while queue and len(inflight) < jobs:
                job = queue.pop(0)
                store.claim(job["cell_id"])
                inflight[remote.remote(job)] = (job, time.time())
                _log(progress, f"  submitted {job['cell_id']} ({_describe(job['params'])}) to Ray")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=progress_interval())
            _status(progress, t_start, len(jobs_list), done + failed, len(inflight))
            for ref in ready:
                job, t0 = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # a Ray-level failure (worker died, ...)
                    rec = {"ok": False, "error": f"Ray task failed: {e}"}
                ok = _record(store, job["cell_id"], rec, progress, _describe(job["params"]), time.time() - t0)
                done += ok
                failed += not ok
    finally:
        for ref, (job, _) in inflight.items():
            ray.cancel(ref, force=True)
            store.fail(job["cell_id"], "interrupted: the sweep was stopped")
    return {"ran_ok": done, "ran_failed": failed}


def dump_plan(rows) -> str:
    """Text table of a dry run."""
    lines = [f"{'experiment':24}  {'#':>4}  {'cell':16}  {'status':9}  params"]
    for name, c, status in rows:
        lines.append(f"{name:24}  {c.index:>4}  {c.id:16}  {status:9}  {_describe(c.params)}")
    return "\n".join(lines)


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
