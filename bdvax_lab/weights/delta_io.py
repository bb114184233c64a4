"""The on-disk format of a weight delta: one directory, written atomically.

``delta.safetensors`` holds one tensor per module under the key ``block.<i>.<kind>``; ``delta.json`` is the
manifest: format name and version, the layout summary, the delta's ``meta`` and one entry (key, block,
kind, shape, dtype) per tensor. :meth:`WeightDelta.save <bdvax_lab.weights.deltas.WeightDelta.save>` and
:meth:`WeightDelta.load <bdvax_lab.weights.deltas.WeightDelta.load>` are the entry points.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..core.artifacts import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ..core.registry import Key, Layout
from .delta_layout import layout_from_summary, layout_summary

DELTA_TENSORS = "delta.safetensors"


DELTA_JSON = "delta.json"


FORMAT_NAME = "bdvax_lab.weight_delta"


FORMAT_VERSION = 1


_KEY_RE = re.compile(r"^block\.(\d+)\.([a-z]+)$")


class DeltaFormatError(ValueError):
    """A saved delta directory is missing, incomplete or inconsistent (message names the path)."""


def _tensor_key(key: Key) -> str:
    return f"block.{key[0]}.{key[1]}"


def write_delta(path: Path, tensors: dict[Key, torch.Tensor], layout: Layout, meta: dict[str, Any]) -> Path:
    """Write ``path/delta.safetensors`` and ``path/delta.json`` atomically; returns ``path``."""
    entries = [
        {
            "key": _tensor_key(k),
            "block": k[0],
            "kind": k[1],
            "shape": list(t.shape),
            "dtype": str(t.dtype).replace("torch.", ""),
        }
        for k, t in tensors.items()
    ]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": layout_summary(layout),
        "meta": meta,
        "entries": entries,
    }
    with atomic_dir(path, kind=FORMAT_NAME, overwrite=True) as tmp:  # never a foreign directory
        save_tensors(
            tmp / DELTA_TENSORS,
            {_tensor_key(k): t for k, t in tensors.items()},
            metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)},
        )
        write_json(tmp / DELTA_JSON, manifest)
    return path


def read_delta(
    path: Path, device: torch.device | str | None = None
) -> tuple[dict[Key, torch.Tensor], Layout, dict[str, Any]]:
    """``(tensors, layout, meta)`` of a directory written by :func:`write_delta`.

    Raises :class:`DeltaFormatError` naming the path when a file is missing, unreadable or disagrees with
    the manifest; whether the tensors fit the layout is checked by the ``WeightDelta`` built from them.
    """
    if not path.is_dir():
        raise DeltaFormatError(f"{path}: not a saved WeightDelta directory (no such directory)")
    for fname in (DELTA_JSON, DELTA_TENSORS):
        if not (path / fname).is_file():
            raise DeltaFormatError(f"{path / fname}: missing (not a complete WeightDelta directory)")
    try:
        manifest = read_json(path / DELTA_JSON)
    except ValueError as exc:
        raise DeltaFormatError(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DeltaFormatError(f"{path / DELTA_JSON}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DeltaFormatError(f"{path / DELTA_JSON}: unsupported version {manifest.get('version')!r}")
    try:
        layout = layout_from_summary(manifest["layout"])
        entries = {e["key"]: e for e in manifest["entries"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaFormatError(f"{path / DELTA_JSON}: bad layout or entries ({exc})") from None
    try:
        raw = load_tensors(path / DELTA_TENSORS)
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise DeltaFormatError(f"{path / DELTA_TENSORS}: unreadable safetensors ({exc})") from None
    if set(raw) != set(entries):
        raise DeltaFormatError(
            f"{path}: tensor keys and manifest entries differ "
            f"(only in tensors: {sorted(set(raw) - set(entries))}, "
            f"only in manifest: {sorted(set(entries) - set(raw))})"
        )
    tensors: dict[Key, torch.Tensor] = {}
    for name, t in raw.items():
        m = _KEY_RE.match(name)
        if m is None:
            raise DeltaFormatError(
                f"{path / DELTA_TENSORS}: unexpected tensor key {name!r} (want block.<i>.<kind>)"
            )
        if list(t.shape) != list(entries[name]["shape"]):
            raise DeltaFormatError(
                f"{path}: {name} has shape {list(t.shape)}, manifest says {entries[name]['shape']}"
            )
        tensors[(int(m.group(1)), m.group(2))] = t.to(device) if device is not None else t
    return tensors, layout, manifest.get("meta") or {}
