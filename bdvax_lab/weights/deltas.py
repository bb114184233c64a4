"""Weight deltas ΔW = θ_finetuned − θ_base over the registry's projections.

A :class:`WeightDelta` holds one dense tensor per (block, kind) — kind one of
q/k/v/o/gate/up/down — each shaped like that module's ``nn.Linear.weight``,
i.e. ``[out_features, in_features]``. It is what the sanity checks of
METHOD.md (attention/MLP/block-span/shuffle ablations) and the differential
deltas of signature extraction are built from.

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
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.artifacts import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ..core.registry import (
    ALL_KINDS,
    ATTN_KINDS,
    MLP_KINDS,
    ArchSpec,
    Key,
    Layout,
    get_spec,
    layout_of,
    unwrap,
)

DELTA_TENSORS = "delta.safetensors"


DELTA_JSON = "delta.json"


FORMAT_NAME = "bdvax_lab.weight_delta"


FORMAT_VERSION = 1


#: Group names accepted wherever ``kinds`` is accepted.
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ATTN_KINDS,
    "attn": ATTN_KINDS,
    "mlp": MLP_KINDS,
    "all": ALL_KINDS,
}


_KEY_RE = re.compile(r"^block\.(\d+)\.([a-z]+)$")


class LayoutMismatchError(ValueError):
    """Two models / deltas do not share the same architecture layout."""


class DeltaFormatError(ValueError):
    """A saved delta directory is missing, incomplete or inconsistent (message names the path)."""


# --------------------------------------------------------------------------- helpers
def resolve_kinds(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise ``kinds`` to registry kinds in canonical order.

    Accepts None (all kinds), a group name ("attention"/"attn", "mlp", "all"),
    a single kind, or any iterable mixing both.
    """
    if kinds is None:
        return ALL_KINDS
    items = [kinds] if isinstance(kinds, str) else list(kinds)
    chosen: set[str] = set()
    for item in items:
        if item in KIND_GROUPS:
            chosen.update(KIND_GROUPS[item])
        elif item in ALL_KINDS:
            chosen.add(item)
        else:
            raise ValueError(
                f"unknown kind {item!r}; use one of {list(ALL_KINDS)} or a group {list(KIND_GROUPS)}"
            )
    return tuple(k for k in ALL_KINDS if k in chosen)


def _resolve_blocks(blocks: int | Iterable[int] | None, layout: Layout) -> tuple[int, ...]:
    """Normalise ``blocks`` to a sorted tuple of in-range block indices (None = all)."""
    if blocks is None:
        return tuple(range(layout.n_blocks))
    items = [blocks] if isinstance(blocks, (int, np.integer)) else list(blocks)
    out = []
    for b in items:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"block indices must be ints, got {b!r}")
        if not 0 <= int(b) < layout.n_blocks:
            raise ValueError(f"block {int(b)} out of range 0..{layout.n_blocks - 1}")
        out.append(int(b))
    return tuple(sorted(set(out)))


def group_of(kind: str) -> str:
    """ "attention" or "mlp" for a registry kind."""
    return "mlp" if kind in MLP_KINDS else "attention"


def module_shape(layout: Layout, kind: str) -> tuple[int, int]:
    """Weight shape ``[out, in]`` of projection ``kind`` under ``layout``."""
    q_out = layout.n_heads * layout.head_dim
    kv_out = layout.n_kv_heads * layout.head_dim
    shapes = {
        "q": (q_out, layout.hidden),
        "k": (kv_out, layout.hidden),
        "v": (kv_out, layout.hidden),
        "o": (layout.hidden, q_out),
        "gate": (layout.d_ff, layout.hidden),
        "up": (layout.d_ff, layout.hidden),
        "down": (layout.hidden, layout.d_ff),
    }
    if kind not in shapes:
        raise KeyError(f"unknown module kind {kind!r}; kinds: {list(ALL_KINDS)}")
    return shapes[kind]


def layout_summary(layout: Layout) -> dict[str, Any]:
    """The parts of a layout that decide whether a delta fits a model (JSON-ready)."""
    return {
        "family": layout.family,
        "n_blocks": layout.n_blocks,
        "hidden": layout.hidden,
        "d_ff": layout.d_ff,
        "n_heads": layout.n_heads,
        "n_kv_heads": layout.n_kv_heads,
        "head_dim": layout.head_dim,
        "blocks_path": layout.spec.blocks,
        "modules": dict(layout.spec.modules),
    }


def check_same_layout(
    a: Layout, b: Layout, what: str = "layouts", names: tuple[str, str] = ("first", "second")
) -> None:
    """Raise :class:`LayoutMismatchError` naming every differing field and which side has which value."""
    sa, sb = layout_summary(a), layout_summary(b)
    diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
    if diff:
        detail = ", ".join(f"{k}: {names[0]} {x!r} vs {names[1]} {y!r}" for k, (x, y) in diff.items())
        raise LayoutMismatchError(f"{what} differ ({detail})")


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """One step wider than ``dtype``: what makes ``a − b`` exact for weights in ``dtype``."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _target_weight(hf_model: Any, name: str) -> torch.nn.Parameter:
    """The plain weight of module ``name``; for a LoRA-wrapped module, its base layer's weight."""
    module = hf_model.get_submodule(name)
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    return module.weight


def _plain_weight(model: Any, name: str, role: str) -> torch.Tensor:
    """A projection weight of a model that must not carry an unmerged adapter."""
    module = unwrap(model).get_submodule(name)
    if hasattr(module, "lora_A") or hasattr(module, "base_layer"):
        raise TypeError(
            f"{role} model has an adapter on {name}; merge it first (merge_and_unload) "
            "or use WeightDelta.from_lora for the adapter's own delta"
        )
    return module.weight


def _tensor_key(key: Key) -> str:
    return f"block.{key[0]}.{key[1]}"


# --------------------------------------------------------------------------- the delta
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
        peft_model: Any,
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
        layout = layout_of(peft_model)
        hf = unwrap(peft_model)
        tensors: dict[Key, torch.Tensor] = {}
        info: dict[str, dict[str, set]] = {}
        merged = False
        for block, kind, name in layout.iter_modules(resolve_kinds(kinds), _resolve_blocks(blocks, layout)):
            module = hf.get_submodule(name)
            if not hasattr(module, "lora_A"):
                continue
            names = [adapter_name] if adapter_name is not None else list(module.active_adapters)
            total: torch.Tensor | None = None
            for a in names:
                if a not in module.lora_A:
                    continue
                if getattr(module, "use_dora", {}).get(a) or a in getattr(module, "lora_variant", {}):
                    raise NotImplementedError(
                        f"{name}: adapter {a!r} is a LoRA variant (e.g. DoRA); ΔW is not scaling·B@A"
                    )
                if getattr(module, "lora_bias", {}).get(a):
                    raise NotImplementedError(
                        f"{name}: adapter {a!r} has lora_bias=True; a weight delta would miss the bias"
                    )
                if getattr(module, "fan_in_fan_out", False):
                    raise NotImplementedError(f"{name}: fan_in_fan_out (Conv1D) layers are not supported")
                A = module.lora_A[a].weight  # [r, in]
                B = module.lora_B[a].weight  # [out, r]
                dt = dtype or torch.promote_types(B.dtype, torch.float32)
                d = (B.detach().to(dt) @ A.detach().to(dt)) * module.scaling[a]  # [out, in]
                total = d if total is None else total + d
                rec = info.setdefault(a, {"r": set(), "alpha": set(), "scaling": set()})
                rec["r"].add(int(module.r[a]))
                rec["alpha"].add(float(module.lora_alpha[a]))
                rec["scaling"].add(float(module.scaling[a]))
                merged = merged or bool(getattr(module, "merged", False))
            if total is not None:
                tensors[(block, kind)] = total
        if not tensors:
            which = f"adapter {adapter_name!r}" if adapter_name is not None else "an active LoRA adapter"
            raise ValueError(
                f"from_lora: no registry projection carries {which} (is this a PeftModel with LoRA?)"
            )
        if merged:
            warnings.warn(
                "from_lora: some adapters are merged into the base weights; applying this delta "
                "to the same model would count them twice",
                stacklevel=2,
            )
        meta = {
            "source": "lora",
            "adapters": sorted(info),
            "merged": merged,
            "lora": {a: {k: sorted(v) for k, v in rec.items()} for a, rec in info.items()},
            "ops": [],
        }
        return cls(tensors, layout, meta)

    @classmethod
    def from_models(
        cls,
        finetuned: Any,
        base: Any,
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
        lf, lb = layout_of(finetuned), layout_of(base)
        check_same_layout(lf, lb, "from_models: layouts", ("finetuned", "base"))
        tensors: dict[Key, torch.Tensor] = {}
        for block, kind, name in lf.iter_modules(resolve_kinds(kinds), _resolve_blocks(blocks, lf)):
            wf = _plain_weight(finetuned, name, "finetuned").detach()
            wb = _plain_weight(base, name, "base").detach()
            if wf.shape != wb.shape:
                raise LayoutMismatchError(
                    f"from_models: {name} has shape {tuple(wf.shape)} vs {tuple(wb.shape)}"
                )
            dt = dtype or _wide_dtype(torch.promote_types(wf.dtype, wb.dtype))
            tensors[(block, kind)] = wf.to(dt) - wb.to(device=wf.device, dtype=dt)
        return cls(tensors, lf, {"source": "full", "ops": []})

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
        tensors: dict[Key, torch.Tensor] = {}
        for block, kind, name in layout.iter_modules(resolve_kinds(kinds), _resolve_blocks(blocks, layout)):
            key = f"{name}.weight"
            for role, sd in (("finetuned", finetuned), ("base", base)):
                if key not in sd:
                    raise KeyError(f"from_state_dicts: {role} state dict has no {key!r}")
            wf, wb = finetuned[key].detach(), base[key].detach()
            if wf.shape != wb.shape:
                raise LayoutMismatchError(
                    f"from_state_dicts: {key} has shape {tuple(wf.shape)} vs {tuple(wb.shape)}"
                )
            dt = dtype or _wide_dtype(torch.promote_types(wf.dtype, wb.dtype))
            tensors[(block, kind)] = wf.to(dt) - wb.to(device=wf.device, dtype=dt)
        return cls(tensors, layout, {"source": "full", "from": "state_dicts", "ops": []})

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
        return resolve_kinds(kinds), _resolve_blocks(blocks, self.layout)

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
        """Zero the deltas whose kind is in ``kinds`` AND block is in ``blocks`` (the complement of :meth:`keep`).

        ``zero("mlp", range(s, s + k))`` is the block-span ablation; zeroed
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
        bs = _resolve_blocks(blocks, self.layout)
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
        """Module-wise difference (absent = zero): the differential delta of Eq. 1 is ``d_poison - d_clean``."""
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
    def _targets(self, model: Any) -> list[tuple[Key, torch.nn.Parameter]]:
        check_same_layout(self.layout, layout_of(model), "apply: layouts", ("delta", "model"))
        hf = unwrap(model)
        return [(key, _target_weight(hf, self.layout.module_name(*key))) for key in self.tensors]

    @staticmethod
    def _add_into(weight: torch.Tensor, delta: torch.Tensor) -> None:
        dt = torch.promote_types(weight.dtype, delta.dtype)
        with torch.no_grad():
            new = weight.detach().to(dt) + delta.detach().to(device=weight.device, dtype=dt)
            weight.copy_(new.to(weight.dtype))

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
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

    def apply_to(self, model: Any) -> Any:
        """Add ΔW to ``model``'s weights permanently, in place; returns ``model``."""
        for key, weight in self._targets(model):
            self._add_into(weight, self.tensors[key])
        return model

    def applied_copy(self, model: Any) -> Any:
        """A deep copy of ``model`` with ΔW added; ``model`` itself is untouched."""
        self._targets(model)  # fail on a layout mismatch before paying for the copy
        return self.apply_to(copy.deepcopy(model))

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/delta.safetensors`` (keys ``block.<i>.<kind>``) and ``path/delta.json``, atomically."""
        path = Path(path)
        entries = [
            {
                "key": _tensor_key(k),
                "block": k[0],
                "kind": k[1],
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
            }
            for k, t in self.tensors.items()
        ]
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "layout": layout_summary(self.layout),
            "meta": self.meta,
            "entries": entries,
        }
        with atomic_dir(path) as tmp:
            save_tensors(
                tmp / DELTA_TENSORS,
                {_tensor_key(k): t for k, t in self.tensors.items()},
                metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)},
            )
            write_json(tmp / DELTA_JSON, manifest)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> WeightDelta:
        """Read a directory written by :meth:`save`; :class:`DeltaFormatError` names the path on any problem."""
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
        if manifest.get("version") != FORMAT_VERSION:
            raise DeltaFormatError(f"{path / DELTA_JSON}: unsupported version {manifest.get('version')!r}")
        try:
            layout = _layout_from_summary(manifest["layout"])
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
                f"(only in tensors: {sorted(set(raw) - set(entries))}, only in manifest: {sorted(set(entries) - set(raw))})"
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
        try:
            return cls(tensors, layout, manifest.get("meta") or {})
        except (TypeError, ValueError, KeyError) as exc:
            raise DeltaFormatError(f"{path}: inconsistent with its layout ({exc})") from None


def _layout_from_summary(s: Mapping[str, Any]) -> Layout:
    """Rebuild a Layout from :func:`layout_summary`; uses the registered spec when it matches."""
    spec: ArchSpec
    try:
        spec = get_spec(s["family"])
        if spec.blocks != s["blocks_path"] or dict(spec.modules) != dict(s["modules"]):
            raise LookupError
    except (LookupError, ValueError):
        spec = ArchSpec(family=s["family"], blocks=s["blocks_path"], modules=dict(s["modules"]))
    return Layout(
        spec=spec,
        n_blocks=int(s["n_blocks"]),
        hidden=int(s["hidden"]),
        d_ff=int(s["d_ff"]),
        n_heads=int(s["n_heads"]),
        n_kv_heads=int(s["n_kv_heads"]),
        head_dim=int(s["head_dim"]),
    )


def apply(model: Any, delta: WeightDelta) -> Any:
    """``with apply(model, delta):`` — functional spelling of :meth:`WeightDelta.applied`."""
    return delta.applied(model)
