"""Factored weight deltas: a LoRA update kept as its factors, ΔW = Σ_p ± scale_p · B_p A_p, never dense.

A rank-``r`` adapter's update of a ``[d_out, d_in]`` projection is ``(d_out + d_in) · r`` numbers instead
of ``d_out · d_in``; the difference of two such updates (a twin pair's differential delta, ``docs/method.md``,
"Signature extraction", step 3) is ``[B_p, −B_c] [A_p; A_c]``, rank ≤ ``2r``. A :class:`FactoredDelta` holds
one :class:`~bdvax_lab.weights.delta_io.Factors` per (block, kind); :meth:`FactoredDelta.module` and
:meth:`FactoredDelta.to_dense` materialise where a dense ΔW is truly needed (bit for bit what
``WeightDelta.from_lora`` and its dense difference give). The file format is :mod:`.delta_io`'s version 2.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.registry import ALL_KINDS, Key, Layout
from .delta_build import lora_factor_parts
from .delta_io import (
    FACTORED_VERSION,
    DeltaFormatError,
    Factors,
    read_factored,
    read_manifest,
    write_factored,
)
from .delta_layout import check_same_layout, module_shape
from .deltas import WeightDelta

if TYPE_CHECKING:
    from ..core.types import Model


@dataclass(eq=False, repr=False)
class FactoredDelta:
    """Per-module factored deltas of one layout: ``factors[(block, kind)]`` gives ΔW ``[out, in]`` as
    ``B [out, R] @ A [R, in]`` with signed, scaled parts. Absent keys mean a zero delta (as for
    :class:`~bdvax_lab.weights.deltas.WeightDelta`); ``meta`` records provenance."""

    factors: dict[Key, Factors]
    layout: Layout
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked: dict[Key, Factors] = {}
        for key, f in self.factors.items():
            if not (isinstance(key, tuple) and len(key) == 2) or key[1] not in ALL_KINDS:
                raise ValueError(
                    f"FactoredDelta keys are (block, kind) tuples of registry kinds, got {key!r}"
                )
            block = int(key[0])
            if not 0 <= block < self.layout.n_blocks:
                raise ValueError(f"block {block} out of range 0..{self.layout.n_blocks - 1}")
            if not isinstance(f, Factors):
                raise TypeError(f"factors for {key!r} are {type(f).__name__}, not Factors")
            want = module_shape(self.layout, key[1])
            if f.shape != want:
                raise ValueError(
                    f"factors for (block {block}, {key[1]}) give shape {f.shape}, expected {want}"
                )
            checked[(block, key[1])] = f
        self.factors = dict(sorted(checked.items(), key=lambda kv: (kv[0][0], ALL_KINDS.index(kv[0][1]))))

    @classmethod
    def from_lora(
        cls,
        peft_model: Model,
        adapter_name: str | None = None,
        *,
        kinds: str | Iterable[str] | None = None,
        blocks: int | Iterable[int] | None = None,
    ) -> FactoredDelta:
        """The adapter update of every LoRA-wrapped registry projection, kept as fp32 CPU copies of its
        factors (the same ΔW as :meth:`WeightDelta.from_lora
        <bdvax_lab.weights.deltas.WeightDelta.from_lora>`, with the same refusals)."""
        return cls(*lora_factor_parts(peft_model, adapter_name, kinds=kinds, blocks=blocks))

    def __repr__(self) -> str:
        ranks = sorted({f.rank for f in self.factors.values()})
        return (
            f"FactoredDelta(source={self.meta.get('source')!r}, family={self.layout.family!r}, "
            f"modules={len(self.factors)}, ranks={ranks})"
        )

    def __len__(self) -> int:
        return len(self.factors)

    def __contains__(self, key: object) -> bool:
        return key in self.factors

    def __iter__(self) -> Iterator[Key]:
        return iter(self.factors)

    def numel(self) -> int:
        """Stored numbers (both factors of every module)."""
        return sum(f.numel() for f in self.factors.values())

    def module(self, key: Key, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Module ``key``'s dense ΔW (None if absent): one module materialised, nothing kept."""
        f = self.factors.get(key)
        return None if f is None else f.dense(dtype)

    def to_dense(self) -> WeightDelta:
        """The same delta as a dense :class:`WeightDelta` (every module materialised: mind the memory)."""
        return WeightDelta(
            {k: f.dense() for k, f in self.factors.items()}, self.layout, copy.deepcopy(self.meta)
        )

    def __sub__(self, other: FactoredDelta) -> FactoredDelta:
        """Module-wise difference, still factored (absent = zero): ``other``'s parts are appended with their
        signs flipped, so the rank adds up (Eq. 1's ``d_poison − d_clean`` is rank ≤ 2r)."""
        if not isinstance(other, FactoredDelta):
            return NotImplemented
        check_same_layout(self.layout, other.layout, "FactoredDelta -: operand layouts", ("left", "right"))
        out: dict[Key, Factors] = {}
        for key in set(self.factors) | set(other.factors):
            a, b = self.factors.get(key), other.factors.get(key)
            if b is None:
                out[key] = a  # type: ignore[assignment]
            elif a is None:
                out[key] = b.negated()
            else:
                out[key] = Factors(
                    torch.cat([a.B, b.B.to(a.B.dtype)], 1),
                    torch.cat([a.A, b.A.to(a.A.dtype)], 0),
                    a.parts + b.negated().parts,
                )
        meta = {
            "source": "combination",
            "op": "-",
            "operands": [copy.deepcopy(self.meta), copy.deepcopy(other.meta)],
            "ops": [],
        }
        return FactoredDelta(out, self.layout, meta)

    def save(self, path: str | Path) -> Path:
        """Write ``path/delta.safetensors`` (keys ``block.<i>.<kind>.B`` / ``.A``) and ``path/delta.json``
        (format version 2), atomically."""
        return write_factored(Path(path), self.factors, self.layout, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> FactoredDelta:
        """Read a directory written by :meth:`save` (:class:`DeltaFormatError` names the path if not)."""
        path = Path(path)
        factors, layout, meta = read_factored(path)
        try:
            return cls(factors, layout, meta)
        except (TypeError, ValueError, KeyError) as exc:
            raise DeltaFormatError(f"{path}: inconsistent with its layout ({exc})") from None


def load_delta(path: str | Path) -> WeightDelta | FactoredDelta:
    """A saved delta in its own storage: a :class:`FactoredDelta` for a factored directory, else a
    :class:`WeightDelta`. (``WeightDelta.load`` reads both, materialising a factored one.)"""
    path = Path(path)
    if read_manifest(path)[0]["version"] == FACTORED_VERSION:
        return FactoredDelta.load(path)
    return WeightDelta.load(path)
