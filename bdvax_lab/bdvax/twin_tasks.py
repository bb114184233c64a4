"""Twins as remote jobs (Ray tasks): one task per chunk of variants, filling the same twin cache.

The driver plans the variants (:func:`~bdvax_lab.bdvax.twins.plan_twins`: keys, paths, the datasets
answered by the suspicious model) and sends each chunk as JSON-like data with the model's
:class:`~bdvax_lab.threat.source.ModelSource` and fingerprint. The worker opens the model from its
directory (kept open for the worker's next task), checks that it has the driver's fingerprint (else it
would train another model under this one's keys), and runs :func:`~bdvax_lab.bdvax.twins.run_chunk`,
the code the local executor runs: same seeds, same recipes, same entries.

Where the entry goes (:data:`bdvax_lab.core.executor.TRANSFERS`): on a filesystem the worker shares with
the driver it writes the entry itself, atomically and under the entry's lock, so a worker killed
mid-write leaves only a temporary directory that the retry reaps; otherwise it trains into a private
directory and returns the entry's two files through the object store, and the driver checks them and
writes them atomically. ``auto`` tells the two apart by a marker file the driver puts in the cache.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.artifacts import atomic_dir, entry_lock, read_json
from ..core.data import Example
from ..core.executor import Executor
from ..weights.delta_io import DELTA_JSON, DELTA_TENSORS, FORMAT_NAME
from .config import SignatureConfig
from .twins import TwinJob, entry_state, run_chunk
from .variants import VariantSpec

#: the files of one cache entry (the only names a returned entry may carry)
ENTRY_FILES = (DELTA_JSON, DELTA_TENSORS)

#: a worker's open suspicious model: source JSON → (model, tokenizer, fingerprint); one at a time
_OPEN: dict[str, tuple[Any, Any, str]] = {}


def job_payload(job: TwinJob) -> dict[str, Any]:
    """One planned twin job as JSON-like data (its spec, entry path and key, setting and datasets)."""
    clean, poisoned = job.data if job.data is not None else job.spec.datasets()
    return {
        "spec": job.spec.to_dict(),
        "path": str(Path(job.path).absolute()),  # the same on every node that mounts the cache
        "key": job.key,
        "setting": job.setting,
        "data": [[e.to_dict() for e in clean], [e.to_dict() for e in poisoned]],
    }


def job_from_payload(data: dict[str, Any], root: Path | None = None) -> TwinJob:
    """The :class:`TwinJob` of :func:`job_payload` (``root``: put its entry under another cache root)."""
    path = Path(data["path"])
    if root is not None:
        path = root / path.parent.name / path.name
    clean, poisoned = ([Example.from_dict(e) for e in part] for part in data["data"])
    return TwinJob(
        spec=VariantSpec.from_dict(data["spec"]),
        path=path,
        key=data["key"],
        setting=data["setting"],
        data=(clean, poisoned),
    )


def _open_model(source: dict[str, Any], fingerprint: str) -> tuple[Any, Any]:
    """The model of ``source`` in this worker (opened once), refused unless it has the driver's
    fingerprint."""
    from ..core.models import model_fingerprint, release_memory
    from ..threat.source import ModelSource

    key = json.dumps(source, sort_keys=True)
    if key not in _OPEN:
        _OPEN.clear()
        release_memory()
        sm = ModelSource.from_dict(source).open()
        _OPEN[key] = (sm.model, sm.tokenizer, model_fingerprint(sm.model))
    model, tok, fp = _OPEN[key]
    if fp != fingerprint:
        raise ValueError(
            f"{source['path']}: the worker opened a model with fingerprint {fp}, the driver's is "
            f"{fingerprint} (another base, dtype or file on this node?)"
        )
    return model, tok


def twin_task(
    source: dict[str, Any],
    config: dict[str, Any],
    jobs: list[dict[str, Any]],
    fingerprint: str,
    size: int,
    transfer: str,
    marker: str | None,
) -> list[dict[str, Any]]:
    """One chunk of twin jobs in a worker; returns per job its status and seconds, and its entry's files
    (``{name: bytes}``) when the cache is not shared with the driver."""
    from ..core.models import use_all_cores

    use_all_cores()  # $BDVAX_NUM_THREADS: the task's CPUs (bdvax_lab.core.executor.task_threads)
    model, tok = _open_model(source, fingerprint)
    cfg = SignatureConfig.from_dict(config)
    shared = transfer == "filesystem" or (
        transfer == "auto" and marker is not None and Path(marker).is_file()
    )
    if shared:
        todo = [job_from_payload(j) for j in jobs]
        run_chunk(todo, model, tok, cfg, fingerprint, False, size)
        return [{"status": j.status, "seconds": j.seconds} for j in todo]
    with tempfile.TemporaryDirectory(prefix="bdvax-twins-") as tmp:
        todo = [job_from_payload(j, Path(tmp)) for j in jobs]
        run_chunk(todo, model, tok, cfg, fingerprint, False, size)
        return [
            {
                "status": j.status,
                "seconds": j.seconds,
                "files": {name: (j.path / name).read_bytes() for name in ENTRY_FILES},
            }
            for j in todo
        ]


def write_returned_entry(job: TwinJob, files: dict[str, bytes]) -> None:
    """Write an entry returned through the object store at ``job.path``: only its two files, checked
    (manifest of this entry, tensors readable) before the atomic rename; an entry already there stays."""
    from ..weights.factored import load_delta

    if sorted(files) != sorted(ENTRY_FILES):
        raise ValueError(f"{job.path}: a worker returned files {sorted(files)}, expected {list(ENTRY_FILES)}")
    with entry_lock(job.path):
        if entry_state(job.path) == "complete":
            return
        with atomic_dir(job.path, kind=FORMAT_NAME, overwrite=True) as tmp:
            for name in ENTRY_FILES:
                (tmp / name).write_bytes(files[name])
            meta = read_json(tmp / DELTA_JSON).get("meta", {})
            if meta.get("entry") != job.key:
                raise ValueError(f"{job.path}: a worker returned the entry {meta.get('entry')!r}")
            load_delta(tmp)  # safetensors only: parses every tensor the manifest lists
        if entry_state(job.path) != "complete":
            shutil.rmtree(job.path, ignore_errors=True)
            raise ValueError(f"{job.path}: the entry a worker returned is not a complete twin entry")


def run_remote(
    executor: Executor,
    chunks: Sequence[Sequence[TwinJob]],
    source: Any,
    config: SignatureConfig,
    fingerprint: str,
    *,
    size: int,
    desc: str = "twins",
    progress: bool = True,
) -> None:
    """Every chunk a remote task; each job's status and seconds are filled in as its task completes."""
    transfer = executor.config.transfer
    root = Path(chunks[0][0].path).absolute().parent if chunks and chunks[0] else None
    marker = None
    if transfer == "auto" and root is not None:
        root.mkdir(parents=True, exist_ok=True)
        marker = root / f".shared-{uuid.uuid4().hex[:12]}"
        marker.write_text("the bdvax driver's marker: a worker that sees it writes entries here\n")
    work = [
        (
            source.to_dict(),
            config.to_dict(),
            [job_payload(j) for j in chunk],
            fingerprint,
            size,
            transfer,
            None if marker is None else str(marker),
        )
        for chunk in chunks
    ]
    labels = ["variants " + ",".join(str(j.index) for j in chunk) for chunk in chunks]
    try:
        for i, rows in executor.map(twin_task, work, desc=desc, progress=progress, labels=labels):
            for job, row in zip(chunks[i], rows):
                if "files" in row:
                    write_returned_entry(job, row["files"])
                job.status, job.seconds = row["status"], float(row["seconds"])
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
