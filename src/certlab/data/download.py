"""Where dataset files live, how they are checked, and how missing ones are fetched.

Root: the ``root`` argument, else ``$CERTLAB_DATA``, else ``$XDG_CACHE_HOME/certlab`` (default
``~/.cache/certlab``). Each dataset has its own sub-folder (``root/mnist``, ...); a root that already *is* such a
folder (holds the files directly) works too.

Checksums: files we download must match the official md5 (else they are deleted and a :class:`DataError` is
raised); their md5 is then recorded in the folder's ``md5sums`` file (``md5sum`` format). On every load, a file
listed in its folder's ``md5sums`` must match it. Files not listed are checked for structure only (by the parser).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from certlab import fileio
from certlab.errors import DataError

ENV_VAR = "CERTLAB_DATA"
MANIFEST = "md5sums"
TIMEOUT_S = 60

_MD5_CACHE: dict = {}
_LINE = re.compile(r"^([0-9a-fA-F]{32})\s+\*?(\S.*)$")


@dataclass(frozen=True)
class Remote:
    """One official file: its name, the URLs to try in order, and its official md5."""

    name: str
    urls: tuple
    md5: str


def resolve_root(root=None) -> Path:
    """``root`` if given, else ``$CERTLAB_DATA``, else the user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "certlab"


def pick_folder(candidates, names) -> Path:
    """The first candidate folder holding any of ``names`` (a name matches with or without ``.gz``); else the
    first candidate (where downloads go)."""
    for c in candidates:
        if any((c / n).is_file() or (c / (n + ".gz")).is_file() for n in names):
            return c
    return candidates[0]


def cache_key(path: Path):
    """(path, inode, mtime, size) of a file, or ``None`` if it changed in the last 2 s (file-system timestamps can
    be too coarse to tell two quick writes apart, so such a file is never served from a cache)."""
    st = path.stat()
    if time.time() - st.st_mtime < 2.0:
        return None
    return (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)


def md5_file(path: Path) -> str:
    """md5 hex digest (cached per :func:`cache_key`)."""
    key = cache_key(path)
    if key in _MD5_CACHE:
        return _MD5_CACHE[key]
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if key is not None:
        _MD5_CACHE[key] = h.hexdigest()
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    """``{file name: md5}`` from ``folder/md5sums`` (empty if there is none)."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise DataError(f"{path}: line {i} is not '<md5>  <file name>': {line[:80]!r}")
        out[m.group(2).strip()] = m.group(1).lower()
    return out


def verify(path: Path, official: dict) -> str:
    """Check ``path`` against its folder's ``md5sums``. Returns how it was verified:
    ``"official md5"``, ``"md5sums"`` or ``"structure"`` (the parser still checks the structure)."""
    listed = read_manifest(path.parent).get(path.name)
    if listed is not None or path.name in official:
        got = md5_file(path)
        if listed is not None and got != listed:
            raise DataError(f"{path}: md5 {got} does not match {listed} listed in {path.parent / MANIFEST} "
                            "(corrupt file: delete it to download it again)")
        if got == official.get(path.name):
            return "official md5"
        if listed is not None:
            return "md5sums"
    return "structure"


def combine(hows) -> str:
    """The weakest of several :func:`verify` results."""
    hows = set(hows)
    return "structure" if "structure" in hows else ("official md5" if hows == {"official md5"} else "md5sums")


def fetch(url: str, dest: Path) -> None:
    """Write the bytes at ``url`` to ``dest``. Raises ``OSError`` on any network failure (tests replace this)."""
    req = urllib.request.Request(url, headers={"User-Agent": "certlab"})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)


def record(folder: Path, name: str, md5: str | None) -> None:
    """Set (``md5=None``: drop) the entry of ``name`` in ``folder/md5sums`` (atomic rewrite)."""
    entries = read_manifest(folder)
    if md5 is None:
        entries.pop(name, None)
    else:
        entries[name] = md5
    write_atomic(folder / MANIFEST, "".join(f"{v}  {k}\n" for k, v in sorted(entries.items())).encode())


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = fileio.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def where_to_put(dataset: str, folder: Path, remotes) -> str:
    names = ", ".join(r.name for r in remotes)
    urls = " ".join(r.urls[0] for r in remotes)
    return (f"put {names} into {folder} (official copies: {urls}), or pass root=/a/folder or set "
            f"{ENV_VAR} to a folder whose '{folder.name}' sub-folder holds them")


def download(dataset: str, folder: Path, remotes, hint: str | None = None) -> list:
    """Fetch each :class:`Remote` into ``folder`` (atomic, md5-checked, recorded in ``md5sums``).

    Raises :class:`DataError` saying which files to put where (``hint`` overrides that advice) if any file
    cannot be obtained."""
    remotes = list(remotes)
    hint = hint or where_to_put(dataset, folder, remotes)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dataset}: files missing and cannot create {folder} ({e}); "
                        + hint) from None
    out = []
    for r in remotes:
        reasons = []
        for url in r.urls:
            try:
                fd, tmp = fileio.mkstemp(dir=folder, prefix=f".{r.name}.", suffix=".part")
                os.close(fd)
            except OSError as e:
                raise DataError(f"{dataset}: cannot write into {folder} ({e}); "
                                + hint) from None
            tmp = Path(tmp)
            try:
                fetch(url, tmp)
                got = md5_file(tmp)
                if got != r.md5:
                    reasons.append(f"{url}: md5 {got} is not the official {r.md5}, file deleted")
                    continue
                os.replace(tmp, folder / r.name)
                record(folder, r.name, r.md5)
                out.append(folder / r.name)
                break
            except (OSError, http.client.HTTPException) as e:
                reasons.append(f"{url}: {type(e).__name__}: {str(e)[:120]}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"{dataset}: download of {r.name} failed ({'; '.join(reasons)}); "
                            + hint)
    return out
