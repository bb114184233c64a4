"""Where independent jobs run: in this process (:class:`LocalExecutor`, the default) or as Ray tasks
(:class:`RayExecutor`, the optional extra ``bdvax_lab[ray]``).

A job is a plain function and its arguments: JSON-like data (configs as dicts, paths, examples), never
model weights. :meth:`Executor.map` runs every job and yields ``(index, result)`` as jobs complete, with a
progress bar on the driver. Results are what the job returns; a job that fills a content-addressed cache
writes it itself (atomically, under the entry's lock) when the cache is on a filesystem every worker
sees, or returns its files for the driver to write (:data:`TRANSFERS`). The executor never changes what a
job computes, so it is no part of any cache key. Ray tasks request ``num_cpus`` / ``num_gpus`` each and
are retried ``max_retries`` times when their worker dies (a killed process, a lost node); a Python
exception in a job is not retried unless ``retry_exceptions`` (the jobs here are deterministic). Ray is
imported only when a :class:`RayExecutor` is made: importing bdvax_lab never needs it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config

#: ``--executor`` choices
EXECUTORS: tuple[str, ...] = ("local", "ray")

#: how a remote job's cache entry reaches the cache: written by the worker on a shared filesystem,
#: returned through Ray's object store for the driver to write, or ``auto`` (the worker checks whether it
#: sees a marker file the driver wrote in the cache)
TRANSFERS: tuple[str, ...] = ("auto", "filesystem", "object_store")

#: the install command of the extra
RAY_INSTALL = "pip install 'bdvax_lab[ray]'"

_ADDRESS_RE = re.compile(r"^(ray://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class ExecutorError(Exception):
    """An expected failure of the execution engine (one line, naming the input)."""


class MissingExtraError(ExecutorError, ImportError):
    """An optional extra is not installed (the message names it and its install command)."""


class RayAddressError(ExecutorError, ValueError):
    """``--ray-address`` is malformed or no Ray cluster answers there."""


class JobFailedError(ExecutorError, RuntimeError):
    """A job's worker died more often than it may be retried."""


@dataclass
class ExecutorConfig(Config):
    """Which executor runs independent jobs (twins, bench units), and the resources of one Ray task.

    ``kind``: ``local`` (this process, one job after the other; the default) or ``ray``. ``address``:
    None starts a local Ray cluster (or joins the one ``ray start`` left on this machine), ``auto``
    joins a running cluster, ``HOST:PORT`` / ``ray://HOST:PORT`` a given one. ``num_cpus`` / ``num_gpus``:
    what each task requests (a task's torch threads follow ``num_cpus``). ``max_retries``: reruns of a
    task whose worker died. ``transfer``: :data:`TRANSFERS`.
    """

    kind: str = "local"
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3
    retry_exceptions: bool = False
    transfer: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor {self.kind!r}: choose one of {', '.join(EXECUTORS)}")
        if self.transfer not in TRANSFERS:
            raise ValueError(f"executor transfer {self.transfer!r}: choose one of {', '.join(TRANSFERS)}")
        if not self.num_cpus > 0 or self.num_gpus < 0 or self.max_retries < 0:
            raise ValueError(
                f"executor resources: need num_cpus > 0, num_gpus >= 0 and max_retries >= 0, got "
                f"{self.num_cpus}, {self.num_gpus}, {self.max_retries}"
            )
        if self.address is not None:
            check_address(self.address)

    def make(self) -> Executor:
        """The executor this config describes (a :class:`RayExecutor` imports Ray here)."""
        return LocalExecutor(self) if self.kind == "local" else RayExecutor(self)


def check_address(address: str) -> str:
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; anything else: a one-line :class:`RayAddressError`."""
    m = _ADDRESS_RE.match(address)
    if address == "auto" or (m is not None and 0 < int(m["port"]) < 65536):
        return address
    raise RayAddressError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")


def task_threads(num_cpus: float) -> str:
    """The torch threads of one task: ``$BDVAX_NUM_THREADS`` when the driver sets it, else its CPUs."""
    return os.environ.get("BDVAX_NUM_THREADS") or str(max(1, int(num_cpus)))


class Executor:
    """Runs independent jobs; :meth:`map` yields ``(index, result)`` as they complete."""

    config: ExecutorConfig
    #: whether jobs run in other processes (they then open models from disk, not from memory)
    remote: bool = False

    def map(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[tuple[Any, ...]],
        *,
        desc: str = "jobs",
        progress: bool = True,
        labels: Sequence[str] | None = None,
        import_paths: Sequence[str] = (),
    ) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (a local Ray cluster); a no-op otherwise."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """Today's behaviour: every job in this process, one after the other, in order."""

    def __init__(self, config: ExecutorConfig | None = None) -> None:
        self.config = config or ExecutorConfig()

    def map(self, fn, jobs, *, desc="jobs", progress=True, labels=None, import_paths=()):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs, leave=False)
        try:
            for i, args in enumerate(jobs):
                if labels is not None:
                    bar.set_postfix_str(labels[i])
                result = fn(*args)
                bar.update(1)
                yield i, result
        finally:
            bar.close()


class RayExecutor(Executor):
    """Every job a Ray task (resources, retries on worker death); results as tasks complete.

    Connects on first use: to the cluster Ray is already connected to in this process (a notebook's or a
    test's ``ray.init``), else per ``address``. A local cluster this executor started is shut down by
    :meth:`close`.
    """

    remote = True

    def __init__(self, config: ExecutorConfig | None = None, **overrides: Any) -> None:
        cfg = (config or ExecutorConfig(kind="ray")).replace(kind="ray", **overrides)
        self.config = cfg
        self._ray = import_ray()
        self._started = False
        if cfg.address not in (None, "auto"):
            _probe(cfg.address)  # before any work: Ray itself retries an unreachable address for minutes

    def connect(self) -> Any:
        """``ray``, initialised (raises a one-line :class:`RayAddressError` when no cluster answers)."""
        ray = self._ray
        if ray.is_initialized():
            return ray
        address = self.config.address
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        except ConnectionError as exc:
            first = " ".join(str(exc).split()).split(". ")[0]
            raise RayAddressError(
                f"--ray-address {address}: no Ray cluster found ({first}); start one with "
                "`ray start --head`, or leave out --ray-address to start a local one"
            ) from None
        self._started = address is None
        return ray

    def map(self, fn, jobs, *, desc="jobs", progress=True, labels=None, import_paths=()):
        from tqdm.auto import tqdm

        ray = self.connect()
        cfg = self.config
        # every task: its threads, no model hub, and the driver's cache root (a shared path on a cluster)
        env = {"BDVAX_NUM_THREADS": task_threads(cfg.num_cpus), "HF_HUB_OFFLINE": "1"}
        if os.environ.get("BDVAX_CACHE"):
            env["BDVAX_CACHE"] = os.environ["BDVAX_CACHE"]
        if import_paths:
            old = os.environ.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join([*map(str, import_paths), *([old] if old else [])])
        task = ray.remote(fn).options(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            max_retries=cfg.max_retries,
            retry_exceptions=cfg.retry_exceptions,
            runtime_env={"env_vars": env},
        )
        refs = [task.remote(*args) for args in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        bar = tqdm(total=len(refs), desc=f"{desc} (ray)", disable=not progress or not refs, leave=False)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = index[done[0]]
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
                    what = labels[i] if labels is not None else f"job {i}"
                    raise JobFailedError(
                        f"{desc}: {what}: its Ray worker died on each of {cfg.max_retries + 1} attempt(s) "
                        f"({type(exc).__name__}); see the Ray logs (out of memory?)"
                    ) from None
                bar.update(1)
                yield i, result
        finally:
            bar.close()
            for ref in pending:  # an error, or the caller stopped reading: cancel what is left
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


def import_ray() -> Any:
    """``import ray``, or a one-line :class:`MissingExtraError` naming the extra and its install command."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(
            f"--executor ray needs Ray, which is not installed: {RAY_INSTALL} (the 'ray' extra)"
        ) from None
    return ray


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when nothing listens at ``HOST:PORT``: Ray itself retries for minutes."""
    m = _ADDRESS_RE.match(address)
    assert m is not None  # checked by ExecutorConfig
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RayAddressError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
            "with `ray start --head` and pass the address it prints, or use --ray-address auto"
        ) from None


def make_executor(spec: str | ExecutorConfig | Executor | None = None, **overrides: Any) -> Executor:
    """An executor from a name (``local`` / ``ray``), a config, an executor (returned as is) or None
    (local)."""
    if isinstance(spec, Executor):
        return spec
    if spec is None or isinstance(spec, str):
        spec = ExecutorConfig(kind=spec or "local", **overrides)
    elif overrides:
        spec = spec.replace(**overrides)
    return spec.make()
