"""Where a suspicious model comes from, so that another process (a Ray worker) opens the same model.

Weights never travel between processes: a job carries a :class:`ModelSource` (the artifact directory and
the options it was opened with, as JSON), and the worker opens the directory itself with
:func:`~bdvax_lab.threat.suspicious.load_suspicious` (safetensors only). Paths are made absolute, so the
source means the same on every node that mounts the same filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import Config


def _absolute(path: str | Path | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)  # a name ("default", a template name) stays


@dataclass
class ModelSource(Config):
    """A suspicious model's directory and how it is opened: ``base`` (a base directory, a ``.gguf`` file
    or ``default``; None: the artifact's recorded base), ``device`` (None: CUDA if present), ``dtype``
    (a :data:`~bdvax_lab.core.config.DTYPES` name) and ``chat_template`` (a file or a built-in name)."""

    path: str
    base: str | None = None
    device: str | None = None
    dtype: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.path = _absolute(self.path) or ""
        self.base = _absolute(self.base)
        self.chat_template = _absolute(self.chat_template)
        if self.device == "auto":
            self.device = None

    def open(self) -> Any:
        """The :class:`~bdvax_lab.threat.suspicious.SuspiciousModel` at ``path``, opened as described."""
        from ..core.models import parse_dtype
        from .suspicious import load_suspicious

        return load_suspicious(
            self.path,
            base=self.base,
            device=self.device,
            dtype=parse_dtype(self.dtype),
            chat_template=self.chat_template,
        )

    @classmethod
    def of(cls, suspicious: Any) -> ModelSource:
        """The source of a directory or of a :class:`SuspiciousModel` opened from one (its recorded base);
        a model held only in memory has none (``ValueError`` saying what to pass)."""
        if isinstance(suspicious, (str, Path)):
            return cls(path=str(suspicious))
        path = getattr(suspicious, "path", None)
        if path is None:
            raise ValueError(
                "a remote executor opens the suspicious model from its directory in every worker, and this "
                "model has none: save it (bdvax_lab.threat.suspicious.save_suspicious) and pass "
                "source=ModelSource(path, base=...)"
            )
        manifest = getattr(suspicious, "manifest", None) or {}
        return cls(path=str(path), base=manifest.get("base_path"))
