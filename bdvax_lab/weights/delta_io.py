"""The on-disk format of a weight delta: one directory, written atomically.

``delta.safetensors`` holds the tensors, ``delta.json`` the manifest: format name and version, the layout
summary, the delta's ``meta`` and one entry per module (key, block, kind, shape, dtype). Two storages,
told apart by the manifest's ``version``:

* version 1, **dense**: one tensor ``block.<i>.<kind>`` per module, ΔW itself, ``[out, in]``;
* version 2, **factored** (a LoRA delta, or the difference of two): per module the two factors
  ``block.<i>.<kind>.B`` ``[out, R]`` and ``block.<i>.<kind>.A`` ``[R, in]`` of
  ``ΔW = Σ_p sign_p · scale_p · B_p A_p``, the parts ``p`` being consecutive column blocks of ``B`` and
  row blocks of ``A``; the manifest entry lists them (``parts``: ``rank``, ``scale``, ``sign``). A twin's
  differential delta of rank-``r`` adapters is ``R = 2r``: ``[s B_p, −s B_c] [A_p; A_c]``.

:meth:`WeightDelta.save <bdvax_lab.weights.deltas.WeightDelta.save>` /
:meth:`~bdvax_lab.weights.deltas.WeightDelta.load` and
:class:`~bdvax_lab.weights.factored.FactoredDelta` are the entry points; :func:`read_delta` materialises a
factored directory densely, module by module; :class:`DeltaReader` reads one module (or a slice, or its
factors) at a time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.artifacts import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ..core.registry import Key, Layout
from .delta_layout import layout_from_summary, layout_summary

DELTA_TENSORS = "delta.safetensors"


DELTA_JSON = "delta.json"


FORMAT_NAME = "bdvax_lab.weight_delta"


#: dense storage (one ΔW per module)
FORMAT_VERSION = 1


#: factored storage (B and A per module)
FACTORED_VERSION = 2


#: manifest ``version`` → storage
STORAGES = {FORMAT_VERSION: "dense", FACTORED_VERSION: "factored"}


_KEY_RE = re.compile(r"^block\.(\d+)\.([a-z]+)$")


_FACTOR_RE = re.compile(r"^block\.(\d+)\.([a-z]+)\.(A|B)$")


class DeltaFormatError(ValueError):
    """A saved delta directory is missing, incomplete or inconsistent (message names the path)."""


def _tensor_key(key: Key) -> str:
    return f"block.{key[0]}.{key[1]}"


# =========================================================================== factors
@dataclass(frozen=True)
class Factors:
    """One module's factored delta ``ΔW = Σ_p sign_p · scale_p · B_p A_p``.

    ``B`` ``[out, R]`` and ``A`` ``[R, in]`` concatenate the parts (``B_p`` = columns, ``A_p`` = rows of
    part ``p``); ``parts`` is one ``(rank, scale, sign)`` per part, ``sign`` ±1. Positive parts are the
    ones a LoRA adapter gives (``scale`` = its ``scaling``); a difference of two factored deltas appends
    the subtrahend's parts with their signs flipped.
    """

    B: torch.Tensor
    A: torch.Tensor
    parts: tuple[tuple[int, float, int], ...]

    def __post_init__(self) -> None:
        rank = sum(r for r, _, _ in self.parts)
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != rank or self.A.shape[0] != rank:
            raise ValueError(
                f"factors B {tuple(self.B.shape)} and A {tuple(self.A.shape)} do not match parts of total "
                f"rank {rank}"
            )
        if any(s not in (1, -1) for _, _, s in self.parts):
            raise ValueError(f"part signs must be ±1, got {[s for _, _, s in self.parts]}")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.B.shape[1])

    def numel(self) -> int:
        return self.B.numel() + self.A.numel()

    def negated(self) -> Factors:
        """−ΔW (the same factors, every part's sign flipped)."""
        return Factors(self.B, self.A, tuple((r, s, -g) for r, s, g in self.parts))

    def rows(self, lo: int, hi: int) -> Factors:
        """Rows ``lo:hi`` of ΔW, still factored."""
        return Factors(self.B[lo:hi], self.A, self.parts)

    def cols(self, lo: int, hi: int) -> Factors:
        """Columns ``lo:hi`` of ΔW, still factored."""
        return Factors(self.B, self.A[:, lo:hi], self.parts)

    def left(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``U = B · diag(sign_p · scale_p)`` ``[out, R]``, so that ``ΔW = U A``."""
        coef = torch.cat(
            [torch.full((r,), float(g * s), dtype=dtype, device=self.B.device) for r, s, g in self.parts]
        )
        return self.B.to(dtype) * coef

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW ``[out, in]``: ``P − C``, where ``P`` sums the positive parts' ``(B_p @ A_p) · scale_p`` in
        order and ``C`` the negative ones', which is bit for bit what ``WeightDelta.from_lora`` of the two
        adapters and their dense difference computed."""
        dt = dtype or torch.promote_types(self.B.dtype, torch.float32)
        pos: torch.Tensor | None = None
        neg: torch.Tensor | None = None
        o = 0
        for r, s, g in self.parts:
            d = (self.B[:, o : o + r].contiguous().to(dt) @ self.A[o : o + r].to(dt)) * s
            if g > 0:
                pos = d if pos is None else pos + d
            else:
                neg = d if neg is None else neg + d
            o += r
        if pos is None and neg is None:
            return torch.zeros(self.shape, dtype=dt, device=self.B.device)
        if neg is None:
            return pos  # type: ignore[return-value]
        return -neg if pos is None else pos.sub_(neg)


def concat_factors(items: Sequence[Factors]) -> Factors:
    """The sum of several factored deltas of one module, still factored (parts concatenated in order)."""
    return Factors(
        torch.cat([f.B for f in items], dim=1),
        torch.cat([f.A for f in items], dim=0),
        tuple(p for f in items for p in f.parts),
    )


# =========================================================================== writing
def _entry(key: Key, shape: Sequence[int], dtype: torch.dtype) -> dict[str, Any]:
    return {
        "key": _tensor_key(key),
        "block": key[0],
        "kind": key[1],
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
    with atomic_dir(path, kind=FORMAT_NAME, overwrite=True) as tmp:  # never a foreign directory
        save_tensors(
            tmp / DELTA_TENSORS,
            tensors,
            metadata={"format": FORMAT_NAME, "version": str(manifest["version"])},
        )
        write_json(tmp / DELTA_JSON, manifest)
    return path


def write_delta(path: Path, tensors: dict[Key, torch.Tensor], layout: Layout, meta: dict[str, Any]) -> Path:
    """Write a dense delta (``path/delta.safetensors``, ``path/delta.json``) atomically; returns ``path``."""
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": layout_summary(layout),
        "meta": meta,
        "entries": [_entry(k, t.shape, t.dtype) for k, t in tensors.items()],
    }
    return _write(path, {_tensor_key(k): t for k, t in tensors.items()}, manifest)


def write_factored(path: Path, factors: dict[Key, Factors], layout: Layout, meta: dict[str, Any]) -> Path:
    """Write a factored delta (version 2: ``B`` and ``A`` per module, parts in the manifest), atomically."""
    entries, tensors = [], {}
    for k, f in factors.items():
        e = _entry(k, f.shape, f.B.dtype)
        e["rank"] = f.rank
        e["parts"] = [{"rank": int(r), "scale": float(s), "sign": int(g)} for r, s, g in f.parts]
        entries.append(e)
        tensors[f"{_tensor_key(k)}.B"] = f.B
        tensors[f"{_tensor_key(k)}.A"] = f.A
    manifest = {
        "format": FORMAT_NAME,
        "version": FACTORED_VERSION,
        "storage": "factored",
        "layout": layout_summary(layout),
        "meta": meta,
        "entries": entries,
    }
    return _write(path, tensors, manifest)


# =========================================================================== reading
def read_manifest(path: Path) -> tuple[dict[str, Any], Layout, dict[Key, dict[str, Any]]]:
    """``(manifest, layout, entries by key)`` of a delta directory, either storage.

    :class:`DeltaFormatError` (one line, naming the file) for a missing file, a foreign manifest or a
    version this bdvax_lab does not read.
    """
    path = Path(path)
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
    if manifest.get("version") not in STORAGES:
        raise DeltaFormatError(
            f"{path / DELTA_JSON}: unsupported version {manifest.get('version')!r} (this bdvax_lab reads "
            f"{', '.join(f'{v} ({s})' for v, s in STORAGES.items())}); a twin-cache entry is retrained "
            "after `bdvax cache --clean`"
        )
    try:
        layout = layout_from_summary(manifest["layout"])
        entries = {(int(e["block"]), str(e["kind"])): e for e in manifest["entries"]}
        if manifest["version"] == FACTORED_VERSION:
            for e in entries.values():
                e["_parts"] = tuple((int(p["rank"]), float(p["scale"]), int(p["sign"])) for p in e["parts"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaFormatError(f"{path / DELTA_JSON}: bad layout or entries ({exc})") from None
    return manifest, layout, entries


def storage_of(path: Path) -> str:
    """``"dense"`` or ``"factored"``: how the delta directory ``path`` stores its modules."""
    return STORAGES[read_manifest(Path(path))[0]["version"]]


def _factors_from_raw(
    path: Path, raw: dict[str, torch.Tensor], entries: dict[Key, dict]
) -> dict[Key, Factors]:
    """Pair the ``.B`` / ``.A`` tensors of a factored file with their manifest entries."""
    want = {f"{_tensor_key(k)}.{x}" for k in entries for x in "BA"}
    if set(raw) != want:
        raise DeltaFormatError(
            f"{path}: tensor keys and manifest entries differ "
            f"(only in tensors: {sorted(set(raw) - want)[:4]}, "
            f"only in manifest: {sorted(want - set(raw))[:4]})"
        )
    out: dict[Key, Factors] = {}
    for k, e in entries.items():
        try:
            f = Factors(raw[f"{_tensor_key(k)}.B"], raw[f"{_tensor_key(k)}.A"], e["_parts"])
        except ValueError as exc:
            raise DeltaFormatError(f"{path}: {_tensor_key(k)}: {exc}") from None
        if list(f.shape) != list(e["shape"]):
            raise DeltaFormatError(
                f"{path}: {_tensor_key(k)} factors give {list(f.shape)}, manifest {e['shape']}"
            )
        out[k] = f
    return out


def _load_raw(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(path / DELTA_TENSORS)
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise DeltaFormatError(f"{path / DELTA_TENSORS}: unreadable safetensors ({exc})") from None


def read_factored(path: Path) -> tuple[dict[Key, Factors], Layout, dict[str, Any]]:
    """``(factors, layout, meta)`` of a factored directory (:func:`write_factored`)."""
    path = Path(path)
    manifest, layout, entries = read_manifest(path)
    if manifest["version"] != FACTORED_VERSION:
        raise DeltaFormatError(f"{path / DELTA_JSON}: a dense delta, not a factored one")
    return _factors_from_raw(path, _load_raw(path), entries), layout, manifest.get("meta") or {}


def read_delta(
    path: Path, device: torch.device | str | None = None
) -> tuple[dict[Key, torch.Tensor], Layout, dict[str, Any]]:
    """``(tensors, layout, meta)`` of a directory written by :func:`write_delta`, or by
    :func:`write_factored` (then materialised densely, one module at a time).

    Raises :class:`DeltaFormatError` naming the path when a file is missing, unreadable or disagrees with
    the manifest; whether the tensors fit the layout is checked by the ``WeightDelta`` built from them.
    """
    path = Path(path)
    manifest, layout, entries = read_manifest(path)
    raw = _load_raw(path)
    meta = manifest.get("meta") or {}
    if manifest["version"] == FACTORED_VERSION:
        factors = _factors_from_raw(path, raw, entries)
        del raw
        dense = {}
        for k in list(factors):
            t = factors.pop(k).dense()
            dense[k] = t.to(device) if device is not None else t
        return dense, layout, meta
    names = {_tensor_key(k): e for k, e in entries.items()}
    if set(raw) != set(names):
        raise DeltaFormatError(
            f"{path}: tensor keys and manifest entries differ "
            f"(only in tensors: {sorted(set(raw) - set(names))}, "
            f"only in manifest: {sorted(set(names) - set(raw))})"
        )
    tensors: dict[Key, torch.Tensor] = {}
    for name, t in raw.items():
        m = _KEY_RE.match(name)
        if m is None:
            raise DeltaFormatError(
                f"{path / DELTA_TENSORS}: unexpected tensor key {name!r} (want block.<i>.<kind>)"
            )
        if list(t.shape) != list(names[name]["shape"]):
            raise DeltaFormatError(
                f"{path}: {name} has shape {list(t.shape)}, manifest says {names[name]['shape']}"
            )
        tensors[(int(m.group(1)), m.group(2))] = t.to(device) if device is not None else t
    return tensors, layout, meta


class DeltaReader:
    """One module (a slice of one, or its factors) at a time from a saved delta directory, either storage.

    The manifest is read once. Every tensor read opens and closes the safetensors file: a handle kept open
    maps the whole file, and the touched pages of several large files then count as resident memory
    (3.5 GB measured for six dense SmolLM2 twin deltas).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest, self.layout, self.entries = read_manifest(self.path)
        self.storage = STORAGES[manifest["version"]]
        self.layout_summary: dict[str, Any] = dict(manifest["layout"])
        self.meta: dict[str, Any] = manifest.get("meta") or {}
        self.file = str(self.path / DELTA_TENSORS)

    @property
    def keys(self) -> set[Key]:
        return set(self.entries)

    def _open(self) -> Any:
        from safetensors import safe_open

        try:
            return safe_open(self.file, framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise DeltaFormatError(f"{self.file}: unreadable safetensors ({exc})") from None

    def factors(self, key: Key) -> Factors | None:
        """Module ``key``'s factors (None if absent); only for a factored directory."""
        if self.storage != "factored":
            raise DeltaFormatError(f"{self.path}: a dense delta has no factors")
        if key not in self.entries:
            return None
        name = _tensor_key(key)
        with self._open() as f:
            return Factors(f.get_tensor(f"{name}.B"), f.get_tensor(f"{name}.A"), self.entries[key]["_parts"])

    def dense(
        self, key: Key, axis: int | None = None, lo: int = 0, hi: int | None = None
    ) -> torch.Tensor | None:
        """Module ``key`` as ΔW (None if absent), optionally only ``lo:hi`` along ``axis`` (0 rows, 1
        columns); a factored module is materialised for that slice only."""
        if key not in self.entries:
            return None
        if self.storage == "factored":
            f = self.factors(key)
            assert f is not None
            if axis is not None:
                n = f.shape[axis]
                end = n if hi is None else hi
                f = f.rows(lo, end) if axis == 0 else f.cols(lo, end)
            return f.dense()
        with self._open() as f:
            name = _tensor_key(key)
            if axis is None:
                return f.get_tensor(name)
            sl = f.get_slice(name)
            return sl[lo:hi] if axis == 0 else sl[:, lo:hi]
