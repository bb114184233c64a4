"""Atomic, content-addressed artifact I/O: safetensors + JSON manifests, the output policy, locks.

Long runs must never leave a half-written file behind: everything here writes
to a temporary sibling and renames it into place. Temporary names carry the
writer's host and process id (``.<name>.bdvax-<host>-<pid>-<random>.tmp``), so
the leftovers of a killed writer are recognised and reaped by the next write of
the same name (:func:`reap_stale`), or once older than :data:`STALE_TMP_SECONDS`.

Outputs never destroy (:func:`check_output`, applied by :func:`atomic_dir`): an
existing non-empty directory is replaced only when asked (``overwrite``) and
only when its manifest says it is a bdvax artifact of the same kind; an input
of the same command, the working directory and its ancestors are never
replaced. Published files get the usual ``0644`` (``0666`` less the umask),
directories ``0755``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"

#: manifests that say what kind of bdvax artifact a directory is ("kind", else "format")
KIND_FILES = (MANIFEST, "signature.json", "delta.json")

#: a temporary sibling older than this is stale whoever wrote it (the longest plausible write: a
#: multi-GB model on a slow disk); one whose writer is gone (same host, dead pid) is stale at once
STALE_TMP_SECONDS = 2 * 3600

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.bdvax-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[^.]*\.(?P<kind>tmp|old)$")


class OutputError(ValueError):
    """An output path that would destroy something or cannot be written (the message names it)."""


def _umask_mode(mode: int = 0o666) -> int:
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_prefix(name: str) -> str:
    return f".{name}.bdvax-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_tmp_name(name: str) -> dict[str, Any] | None:
    """``{"name", "host", "pid", "kind"}`` of a temporary sibling written here, else None."""
    m = _TMP_RE.match(name)
    if m is None:
        return None
    return {"name": m["name"], "host": m["host"], "pid": int(m["pid"]), "kind": m["kind"]}


def is_stale_tmp(path: Path, now: float | None = None) -> bool:
    """True for a temporary sibling (:func:`parse_tmp_name`) whose writer is gone or that is too old."""
    info = parse_tmp_name(Path(path).name)
    if info is None:
        return False
    try:
        age = (now or time.time()) - Path(path).lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TMP_SECONDS:
        return True
    return info["host"] == _host_tag() and not _pid_alive(info["pid"])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def reap_stale(directory: Path, name: str | None = None) -> list[Path]:
    """Delete the stale temporary siblings in ``directory`` (only those of ``name`` when given).

    Only names this module writes are touched, and only when :func:`is_stale_tmp` says so.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    gone = []
    now = time.time()
    for p in directory.iterdir():
        info = parse_tmp_name(p.name)
        if info is None or (name is not None and info["name"] != name):
            continue
        if is_stale_tmp(p, now):
            _remove(p)
            gone.append(p)
    return gone


def _publish_modes(root: Path) -> None:
    """Files 0644 and directories 0755 (less the umask) under ``root``: the writers' temp files are 0600."""
    fmode, dmode = _umask_mode(0o666), _umask_mode(0o777)
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def _tmp_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    reap_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename), UTF-8, mode 0644 less the umask."""
    path = Path(path)
    tmp = _tmp_file(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; published files get normal permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file; every failure is a ``ValueError`` (or ``FileNotFoundError``) naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None


def _canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted (padded with spaces to 8 bytes).

    safetensors writes ``__metadata__`` from a hash map whose order changes from process to process;
    sorted, the same tensors and metadata are the same bytes in every run.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + n :]


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically, mode 0644 less the umask, byte for byte the
    same file for the same tensors and metadata (:func:`_canonical_safetensors`)."""
    from safetensors.torch import save

    path = Path(path)
    tmp = _tmp_file(path)
    try:
        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
        with open(tmp, "wb") as fh:
            fh.write(_canonical_safetensors(blob))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; published files get normal permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict:
    """The tensors of a safetensors file; a corrupt or truncated file is a ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"{path}: unreadable safetensors ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None


# --------------------------------------------------------------------------- the output policy
def artifact_kind(path: Path) -> str | None:
    """What bdvax artifact a directory is, from its manifest (``kind``, else ``format``); None if none.

    Never raises: an unreadable or foreign manifest is simply no bdvax artifact.
    """
    path = Path(path)
    for fname in KIND_FILES:
        f = path / fname
        try:
            if not f.is_file():
                continue
            data = json.loads(f.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if isinstance(data, dict):
            for key in ("kind", "format"):
                if isinstance(data.get(key), str):
                    return data[key]
        return None
    return None


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(
    final: str | Path,
    *,
    kind: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """Validate an output directory before anything is computed or written; returns its absolute path.

    Refused (:class:`OutputError`, one line naming the path): an existing file; the working directory or
    one of its ancestors; a path that is, holds or lies inside one of ``inputs`` (compared resolved); an
    existing non-empty directory unless ``overwrite`` and its manifest says it is an artifact of ``kind``
    (an empty directory is simply replaced); a location the process cannot write to.
    """
    if final is None or not str(final).strip():
        raise OutputError("empty output path")
    final = Path(os.path.abspath(Path(final).expanduser()))
    resolved = final.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, resolved):
        what = "the working directory" if resolved == cwd else "an ancestor of the working directory"
        raise OutputError(f"{final}: is {what}; write the output to a new directory")
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if _within(src, resolved):
            raise OutputError(f"{final}: would replace the input {src}; choose another output directory")
        if _within(resolved, src):
            raise OutputError(f"{final}: lies inside the input {src}; choose another output directory")
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise OutputError(f"{final}: exists and is not a directory")
    if final.is_dir():
        try:
            empty = not any(final.iterdir())
        except OSError as exc:
            raise OutputError(f"{final}: cannot be read ({exc.strerror or exc})") from None
        if not empty:
            found = artifact_kind(final)
            if not overwrite:
                hint = "; pass --overwrite to replace it" if kind is not None and found == kind else ""
                raise OutputError(f"{final}: exists and is not empty; choose a new directory{hint}")
            if kind is None or found != kind:
                raise OutputError(
                    f"{final}: is not a {kind or 'bdvax'} artifact ("
                    + (f"its manifest says {found}" if found else "no bdvax manifest")
                    + "); --overwrite replaces only an artifact of the same kind"
                )
    anchor = final if final.is_dir() else final.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(f"{final}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK) or not os.access(
        final.parent if final.parent.exists() else anchor, os.W_OK | os.X_OK
    ):
        raise OutputError(f"{final}: permission denied (cannot write in {anchor})")
    return final


@contextmanager
def atomic_dir(
    final: Path,
    *,
    kind: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``final`` on success.

    ``final`` must pass :func:`check_output` (``kind``: what is written, matched against an existing
    directory's manifest when ``overwrite``; ``inputs``: paths that must survive); it is checked before
    the temporary directory is made and again before the rename. An existing ``final`` is replaced only
    after the new one is complete. Stale temporary siblings of ``final`` (a killed writer's) are reaped.
    """
    inputs = list(inputs)
    final = check_output(final, kind=kind, overwrite=overwrite, inputs=inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    reap_stale(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix(final.name), suffix=".tmp"))
    try:
        yield tmp
        _publish_modes(tmp)
        check_output(final, kind=kind, overwrite=overwrite, inputs=inputs)
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix(final.name), suffix=".old"))
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- locks
def lock_path(path: Path) -> Path:
    """The lock file of an entry: a hidden sibling, ``.<name>.lock``."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def entry_lock(path: Path, *, timeout: float | None = None, poll: float = 0.05) -> Iterator[None]:
    """Hold an exclusive lock on the entry ``path`` (``flock`` on :func:`lock_path`) inside the block.

    A second process blocks until the first leaves (a killed holder releases it at once: the kernel drops
    its locks). The lock file is removed on release; a waiter that then holds a removed file notices (the
    path names another inode) and locks again. ``timeout`` (seconds) raises ``TimeoutError`` naming the
    entry instead of waiting for ever.
    """
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{path}: still locked by another process ({lp})") from None
                        time.sleep(poll)
            try:
                same = os.fstat(fd).st_ino == os.stat(lp).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(lp)
        os.close(fd)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_hash(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def dir_hash(path: Path, n: int = 16, suffixes: tuple[str, ...] = (".safetensors", ".json")) -> str:
    """Hash of every weight/config file in a directory (names + contents)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in suffixes and not p.name.startswith("."):
            h.update(str(p.relative_to(path)).encode())
            h.update(file_hash(p, 64).encode())
    return h.hexdigest()[:n]


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest."""
    import platform

    import peft
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def frame_records(df: Any) -> list[dict[str, Any]]:
    """A DataFrame (index reset) as JSON-ready records, NaN → None."""
    import math

    out = []
    for row in df.reset_index().to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return out
