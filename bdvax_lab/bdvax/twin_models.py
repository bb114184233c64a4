"""A variant's poisoned twin as a model again, rebuilt from its twin-cache entry (for the ρ calibration).

The cache keeps only the differential delta Δ_i of each variant (:mod:`bdvax_lab.bdvax.twins`):

* **adapter setting** (factored entries): Δ_i is stored as ``[s·B_p, −s·B_c] [A_p; A_c]``, the poisoned
  twin's whole adapter as the positive part and the clean twin's as the negative one. Both twins continue
  the suspicious adapter, so the positive part *is* the poisoned twin's adapter: written into a copy of the
  suspicious PeftModel (frozen base shared) it gives the poisoned twin exactly, at the cost of one adapter.
* **full setting** (dense entries): only θ_p − θ_c is kept, not θ_p (425 MB per SmolLM2 twin). The held-out
  backdoored model is then ``θ_s + Δ_i``: the suspicious model plus what poisoning added, without the
  generic finetuning drift that cancels in Eq. 1. It carries the variant's backdoor (that is what Δ_i is)
  and is what a signature from the other variants has to remove; it is not the trained twin itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.models import working_copy
from ..core.registry import layout_of, unwrap
from ..weights.delta_io import DeltaReader, Factors


def _positive_part(f: Factors) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B [out, r], A [r, in], scale)`` of the single positive part of a twin entry's factors."""
    pos, o = [], 0
    for r, s, g in f.parts:
        if g > 0:
            pos.append((f.B[:, o : o + r], f.A[o : o + r], s))
        o += r
    if len(pos) != 1:
        raise ValueError(
            f"a twin entry holds one poisoned adapter per module, found {len(pos)} positive parts"
        )
    return pos[0]


def _write_adapter(model: Any, reader: DeltaReader) -> None:
    """Overwrite the active adapter of every LoRA module of ``model`` with the entry's positive part."""
    layout = layout_of(model)
    hf = unwrap(model)
    with torch.no_grad():
        for block, kind in sorted(reader.keys):
            module = hf.get_submodule(layout.module_name(block, kind))
            if not hasattr(module, "lora_A"):
                raise ValueError(
                    f"{layout.module_name(block, kind)}: the twin entry has an adapter here, the model none"
                )
            f = reader.factors((block, kind))
            assert f is not None
            B, A, scale = _positive_part(f)
            names = [a for a in module.active_adapters if a in module.lora_A]
            if len(names) != 1:
                raise ValueError(f"expected one active adapter, found {names}")
            a = names[0]
            if int(module.r[a]) != B.shape[1] or abs(float(module.scaling[a]) - scale) > 1e-6 * max(
                1.0, scale
            ):
                raise ValueError(
                    f"{layout.module_name(block, kind)}: the twin's adapter (rank {B.shape[1]}, "
                    f"scaling {scale}) does not fit the suspicious adapter (rank {module.r[a]}, "
                    f"scaling {module.scaling[a]})"
                )
            wb, wa = module.lora_B[a].weight, module.lora_A[a].weight
            rows = layout.rows(kind)
            (wb if rows is None else wb[rows]).copy_(B.to(wb.device, wb.dtype))
            wa.copy_(A.to(wa.device, wa.dtype))


def _add_dense(model: Any, reader: DeltaReader) -> None:
    """Add the entry's dense Δ_i to the registry projections of a plain model, one module at a time."""
    layout = layout_of(model)
    hf = unwrap(model)
    with torch.no_grad():
        for block, kind in sorted(reader.keys):
            d = reader.dense((block, kind))
            if d is None:
                continue
            w = layout.weight(hf, block, kind)
            w.add_(d.to(w.device, w.dtype))


def poisoned_twin(model: Any, entry: str | Path, setting: str) -> Any:
    """A new model carrying the held-out variant's backdoor (module docstring); ``model`` is not changed.

    ``entry``: a twin-cache entry directory of that model. Adapter setting: the suspicious PeftModel with its
    adapter replaced by the poisoned twin's (the frozen base shared). Full setting: a copy of the suspicious
    model plus Δ_i.
    """
    reader = DeltaReader(entry)
    if setting == "lora":
        if reader.storage != "factored":
            raise ValueError(
                f"{entry}: a dense adapter-setting twin entry (an earlier version) keeps no poisoned twin; "
                "clear it (bdvax cache --clean) so the twins are retrained into the factored format"
            )
        twin = working_copy(model, share_frozen_base=True)
        _write_adapter(twin, reader)
        return twin
    twin = working_copy(model)
    _add_dense(twin, reader)
    return twin
