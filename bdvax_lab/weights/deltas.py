"""Weight deltas ΔW = θ_finetuned − θ_base over the registry's projections.

A :class:`WeightDelta` holds one dense tensor per (block, kind) — kind one of
q/k/v/o/gate/up/down — each shaped like that module's ``nn.Linear.weight``,
i.e. ``[out_features, in_features]``. It is what the sanity checks of
``docs/method.md`` ("Sanity checks": attention/MLP/block-span/shuffle ablations)
and the differential deltas of signature extraction are built from.

This module is the container and its operations (selection, algebra, norms,
applying to a model). Building one from an adapter, two models or two state
dicts is :mod:`.delta_build`; the file format is :mod:`.delta_io`; kinds,
shapes and layout checks are :mod:`.delta_layout`.

Conventions
-----------
* A module **absent** from ``tensors`` has a zero delta. LoRA deltas only hold
  the LoRA-wrapped projections, and :meth:`WeightDelta.zero` drops entries
  rather than storing zero tensors (no memory spent on zeros).
* Every selection/algebra method returns a NEW object and never mutates.
  Unchanged tensors are *shared* between the old and new object, so treat
  ``delta.tensors[...]`` as read-only.
* Precision: :meth:`WeightDelta.from_models` stores deltas one step wider than
  the weights by default (fp32 weights → fp64 delta, bf16/fp16 → fp32), so
  ``base + (finetuned − base)`` reproduces the finetuned weights bit-exactly.
  In plain fp32 about 1 in 6 entries of a real finetune would be off by an ulp.
  Pass ``dtype=torch.float32`` to halve the memory when exactness does not matter.
* Applying adds in the wider of (weight dtype, delta dtype) and casts back to
  the weight's dtype and device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.registry import ALL_KINDS, MLP_KINDS, Key, Layout, layout_of, unwrap
from .delta_build import lora_delta_parts, model_delta_parts, state_dict_delta_parts
from .delta_io import DeltaFormatError, read_delta, write_delta
from .delta_layout import check_same_layout, group_of, module_shape, resolve_blocks, resolve_kinds

if TYPE_CHECKING:
    from ..core.types import Model


def _target_weight(hf_model: Any, layout: Layout, key: Key) -> torch.Tensor:
    """The plain weight of projection ``key`` (its rows of a fused module); under LoRA, the base layer's."""
    return layout.weight(hf_model, *key, base_layer=True)


@dataclass(eq=False, repr=False)
class WeightDelta:
    """Per-module weight deltas of one architecture layout.

    ``tensors[(block, kind)]`` is a dense ΔW shaped like that module's weight,
    ``[out, in]``: q ``[n_heads·head_dim, hidden]``, k/v ``[n_kv_heads·head_dim, hidden]``,
    o ``[hidden, n_heads·head_dim]``, gate/up ``[d_ff, hidden]``, down ``[hidden, d_ff]``.
    Absent keys mean a zero delta. ``meta`` records provenance (``source``:
    "lora" | "full" | "combination", and an ``ops`` list of selections applied).
    """

    tensors: dict[Key, torch.Tensor]
    layout: Layout
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked: dict[Key, torch.Tensor] = {}
        for key, t in self.tensors.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"WeightDelta keys are (block, kind) tuples, got {key!r}")
            block, kind = int(key[0]), key[1]
            if kind not in ALL_KINDS:
                raise ValueError(f"unknown kind {kind!r} in key {key!r}; kinds: {list(ALL_KINDS)}")
            if not 0 <= block < self.layout.n_blocks:
                raise ValueError(f"block {block} out of range 0..{self.layout.n_blocks - 1}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"delta for {key!r} is {type(t).__name__}, not a tensor")
            want = module_shape(self.layout, kind)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"delta for (block {block}, {kind}) has shape {tuple(t.shape)}, expected {want}"
                )
            checked[(block, kind)] = t
        self.tensors = dict(sorted(checked.items(), key=lambda kv: (kv[0][0], ALL_KINDS.index(kv[0][1]))))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_lora(
        cls,
        peft_model: Model,
        adapter_name: str | None = None,
        *,
        kinds: str | Iterable[str] | None = None,
        blocks: int | Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> WeightDelta:
        """ΔW = scaling · B @ A for every LoRA-wrapped registry projection of ``peft_model``.

        Reads A, B and scaling from the live peft modules (so rank/alpha/rsLoRA
        and per-module rank patterns are whatever the module actually uses).
        ``adapter_name=None`` takes each module's active adapters, summed when
        several are active (as peft's merge does). Modules without LoRA are
        absent. ``dtype`` defaults to fp32 (at least the adapter's dtype).
        DoRA / other LoRA variants, ``lora_bias`` and ``fan_in_fan_out`` are
        refused: their effect is not a plain ``B @ A`` on ``weight``.
        """
        return cls(*lora_delta_parts(peft_model, adapter_name, kinds=kinds, blocks=blocks, dtype=dtype))

    @classmethod
    def from_models(
        cls,
        finetuned: Model,
        base: Model,
        *,
        kinds: str | Iterable[str] | None = None,
        blocks: int | Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> WeightDelta:
        """ΔW = W_finetuned − W_base for the registry projections of two plain models.

        Both must have the same layout (:class:`LayoutMismatchError` otherwise) and
        no unmerged adapter. ``dtype=None`` picks one step wider than the
        weights so that base + ΔW is bit-exact. Computed on the finetuned
        model's device.
        """
        return cls(*model_delta_parts(finetuned, base, kinds=kinds, blocks=blocks, dtype=dtype))

    @classmethod
    def from_state_dicts(
        cls,
        finetuned: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        layout: Layout,
        *,
        kinds: str | Iterable[str] | None = None,
        blocks: int | Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> WeightDelta:
        """Like :meth:`from_models` from two HF state dicts (keys ``<module_name>.weight``)."""
        return cls(*state_dict_delta_parts(finetuned, base, layout, kinds=kinds, blocks=blocks, dtype=dtype))

    # ----------------------------------------------------------------- basics
    def __repr__(self) -> str:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self.tensors.values()})
        return (
            f"WeightDelta(source={self.meta.get('source')!r}, family={self.layout.family!r}, "
            f"modules={len(self.tensors)}, blocks={len(self.blocks())}/{self.layout.n_blocks}, "
            f"kinds={list(self.kinds())}, dtype={dtypes})"
        )

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.tensors)

    def blocks(self) -> list[int]:
        """Sorted block indices that have at least one delta."""
        return sorted({b for b, _ in self.tensors})

    def kinds(self) -> tuple[str, ...]:
        """Kinds present in any block, in registry order."""
        present = {k for _, k in self.tensors}
        return tuple(k for k in ALL_KINDS if k in present)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def _derive(self, tensors: dict[Key, torch.Tensor], op: dict[str, Any], **meta: Any) -> WeightDelta:
        """A new delta on the same layout with ``op`` appended to the provenance."""
        new_meta = copy.deepcopy(self.meta)
        new_meta.setdefault("ops", []).append(op)
        new_meta.update(meta)
        return WeightDelta(tensors, self.layout, new_meta)

    def _selected(self, kinds: Any, blocks: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
        return resolve_kinds(kinds), resolve_blocks(blocks, self.layout)

    # ----------------------------------------------------------------- selection
    def keep(
        self, kinds: str | Iterable[str] | None = None, blocks: int | Iterable[int] | None = None
    ) -> WeightDelta:
        """Only the deltas whose kind is in ``kinds`` AND block is in ``blocks`` (None = all)."""
        ks, bs = self._selected(kinds, blocks)
        kept = {key: t for key, t in self.tensors.items() if key[1] in ks and key[0] in bs}
        return self._derive(kept, {"op": "keep", "kinds": list(ks), "blocks": list(bs)})

    def zero(
        self, kinds: str | Iterable[str] | None = None, blocks: int | Iterable[int] | None = None
    ) -> WeightDelta:
        """Zero the deltas whose kind is in ``kinds`` AND block is in ``blocks`` (None = all).

        The complement of :meth:`keep`. ``zero("mlp", range(s, s + k))`` is the block-span ablation; zeroed
        entries are dropped (absent = zero).
        """
        ks, bs = self._selected(kinds, blocks)
        kept = {key: t for key, t in self.tensors.items() if not (key[1] in ks and key[0] in bs)}
        return self._derive(kept, {"op": "zero", "kinds": list(ks), "blocks": list(bs)})

    def permute_blocks(
        self,
        seed: int,
        kinds: str | Iterable[str] | None = MLP_KINDS,
        blocks: Iterable[int] | None = None,
    ) -> WeightDelta:
        """Shuffle the ``kinds`` deltas across ``blocks`` with a seeded permutation (shuffle ablation).

        Block ``blocks[i]`` receives the deltas of block ``blocks[source_of[i]]``
        for every chosen kind at once (a block's delta moves as a whole; an
        absent delta moves as absent). Other kinds stay where they are. The
        permutation is recorded in ``meta["permutation"]``; it may be the
        identity by chance when there are few blocks.
        """
        ks = resolve_kinds(kinds)
        bs = resolve_blocks(blocks, self.layout)
        perm = np.random.default_rng(seed).permutation(len(bs)).tolist()
        source = {bs[i]: bs[perm[i]] for i in range(len(bs))}
        out: dict[Key, torch.Tensor] = {}
        for (b, k), t in self.tensors.items():
            if k not in ks or b not in source:
                out[(b, k)] = t
        for dest, src in source.items():
            for k in ks:
                if (src, k) in self.tensors:
                    out[(dest, k)] = self.tensors[(src, k)]
        record = {
            "seed": int(seed),
            "kinds": list(ks),
            "blocks": list(bs),
            "source_of": [bs[p] for p in perm],
        }
        return self._derive(out, {"op": "permute_blocks", **record}, permutation=record)

    # ----------------------------------------------------------------- algebra
    def scale(self, alpha: float) -> WeightDelta:
        """α · ΔW for every module."""
        return self._derive(
            {k: t * alpha for k, t in self.tensors.items()}, {"op": "scale", "alpha": float(alpha)}
        )

    def _combine(self, other: WeightDelta, sign: float, op: str) -> WeightDelta:
        if not isinstance(other, WeightDelta):
            return NotImplemented
        check_same_layout(self.layout, other.layout, f"WeightDelta {op}: operand layouts", ("left", "right"))
        out: dict[Key, torch.Tensor] = {}
        for key in set(self.tensors) | set(other.tensors):
            a, b = self.tensors.get(key), other.tensors.get(key)
            if b is None:
                out[key] = a
            elif a is None:
                out[key] = b * sign
            else:
                dt = torch.promote_types(a.dtype, b.dtype)
                out[key] = a.to(dt) + b.to(device=a.device, dtype=dt) * sign
        meta = {
            "source": "combination",
            "op": op,
            "operands": [copy.deepcopy(self.meta), copy.deepcopy(other.meta)],
            "ops": [],
        }
        return WeightDelta(out, self.layout, meta)

    def __add__(self, other: WeightDelta) -> WeightDelta:
        """Module-wise sum (absent = zero)."""
        return self._combine(other, 1.0, "+")

    def __sub__(self, other: WeightDelta) -> WeightDelta:
        """Module-wise difference (absent = zero).

        The differential delta of Eq. 1 is ``d_poison - d_clean``.
        """
        return self._combine(other, -1.0, "-")

    def __neg__(self) -> WeightDelta:
        return self.scale(-1.0)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> WeightDelta:
        """A copy with every tensor moved/cast."""
        return self._derive(
            {k: t.to(device=device, dtype=dtype) for k, t in self.tensors.items()},
            {"op": "to", "device": str(device), "dtype": str(dtype)},
        )

    def allclose(self, other: WeightDelta, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """Same keys and all tensors close (compared in the wider dtype, on CPU)."""
        if set(self.tensors) != set(other.tensors):
            return False
        for key, a in self.tensors.items():
            b = other.tensors[key]
            dt = torch.promote_types(a.dtype, b.dtype)
            if not torch.allclose(a.detach().cpu().to(dt), b.detach().cpu().to(dt), rtol=rtol, atol=atol):
                return False
        return True

    # ----------------------------------------------------------------- norms
    def norms(self, include_absent: bool = False) -> pd.DataFrame:
        """One row per (block, kind): block, kind, group, fro_norm (Frobenius norm of ΔW), numel.

        With ``include_absent`` every layout module gets a row (absent ones with
        norm 0 and ``present=False``), which is handy for ablation tables.
        """
        rows = []
        keys = (
            [(b, k) for b in range(self.layout.n_blocks) for k in ALL_KINDS]
            if include_absent
            else list(self.tensors)
        )
        for b, k in keys:
            t = self.tensors.get((b, k))
            rows.append(
                {
                    "block": b,
                    "kind": k,
                    "group": group_of(k),
                    "fro_norm": float(torch.linalg.vector_norm(t.double())) if t is not None else 0.0,
                    "numel": t.numel() if t is not None else 0,
                    "present": t is not None,
                }
            )
        cols = ["block", "kind", "group", "fro_norm", "numel", "present"]
        return pd.DataFrame(rows, columns=cols)

    def block_norms(self, include_absent: bool = False) -> pd.DataFrame:
        """One row per (block, group): Frobenius norm of the group's deltas in that block
        (sqrt of the summed squared module norms) and how many modules contributed."""
        df = self.norms(include_absent=include_absent)
        cols = ["block", "group", "fro_norm", "n_modules"]
        if df.empty:
            return pd.DataFrame(columns=cols)
        df = df.assign(sq=df["fro_norm"] ** 2)
        out = df.groupby(["block", "group"], as_index=False).agg(
            sq=("sq", "sum"), n_modules=("present", "sum")
        )
        out["fro_norm"] = out["sq"].map(math.sqrt)
        return out[cols].sort_values(["block", "group"]).reset_index(drop=True)

    # ----------------------------------------------------------------- applying
    def _targets(self, model: Model) -> list[tuple[Key, torch.nn.Parameter]]:
        check_same_layout(self.layout, layout_of(model), "apply: layouts", ("delta", "model"))
        hf = unwrap(model)
        return [(key, _target_weight(hf, self.layout, key)) for key in self.tensors]

    @staticmethod
    def _add_into(weight: torch.Tensor, delta: torch.Tensor) -> None:
        dt = torch.promote_types(weight.dtype, delta.dtype)
        with torch.no_grad():
            new = weight.detach().to(dt) + delta.detach().to(device=weight.device, dtype=dt)
            weight.copy_(new.to(weight.dtype))

    @contextmanager
    def applied(self, model: Model) -> Iterator[Model]:
        """``with delta.applied(model):`` — model weights become W + ΔW inside, bit-exact originals after.

        Works on a plain HF model and on a PeftModel (then the base weights
        under the adapter are changed). The touched weights are copied before
        the change and copied back on exit, also when the body raises.
        """
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            for key, weight in self._targets(model):
                saved.append((weight, weight.detach().clone()))
                self._add_into(weight, self.tensors[key])
            yield model
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)

    def apply_to(self, model: Model) -> Model:
        """Add ΔW to ``model``'s weights permanently, in place; returns ``model``."""
        for key, weight in self._targets(model):
            self._add_into(weight, self.tensors[key])
        return model

    def applied_copy(self, model: Model) -> Model:
        """A deep copy of ``model`` with ΔW added; ``model`` itself is untouched."""
        self._targets(model)  # fail on a layout mismatch before paying for the copy
        return self.apply_to(copy.deepcopy(model))

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/delta.safetensors`` (keys ``block.<i>.<kind>``) and ``path/delta.json``, atomically.

        The format is :mod:`bdvax_lab.weights.delta_io`'s.
        """
        return write_delta(Path(path), self.tensors, self.layout, self.meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> WeightDelta:
        """Read a directory written by :meth:`save`.

        :class:`~bdvax_lab.weights.delta_io.DeltaFormatError` names the path on any problem.
        """
        path = Path(path)
        tensors, layout, meta = read_delta(path, device)
        try:
            return cls(tensors, layout, meta)
        except (TypeError, ValueError, KeyError) as exc:
            raise DeltaFormatError(f"{path}: inconsistent with its layout ({exc})") from None


def apply(model: Model, delta: WeightDelta) -> AbstractContextManager[Model]:
    """``with apply(model, delta):`` — functional spelling of :meth:`WeightDelta.applied`."""
    return delta.applied(model)
