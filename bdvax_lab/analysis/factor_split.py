"""Why a LoRA signature follows the finetune's own ‖ΔW‖: each twin difference split by the factor it moves.

In the adapter setting both twins continue the suspicious adapter ``(B_s, A_s)``, so a twin pair's
differential delta (Eq. 1) is ``B_p A_p − B_c A_c``. With ``dB = B_p − B_c``, ``dA = A_p − A_c`` and the
twins' means ``B̄``, ``Ā``, it is exactly ``dB Ā + B̄ dA``. For a channel that is an output row (gate, up;
:data:`~bdvax_lab.core.registry.CHANNEL_DIM` 0), row ``j`` is ``dB[j] Ā + B̄[j] dA``:

* ``own``: ``dB[j] Ā``, the twins moving channel ``j``'s own slice of ``B`` (its gradient is
  channel-specific);
* ``shared``: ``B̄[j] dA``, one change of the shared factor ``A`` read through the channel's existing row.
  Its size follows ``‖B̄[j]‖``, the channel's weight in the suspicious update, whatever the backdoor.

For an input column (down, axis 1) the roles swap: ``own`` is ``B̄ dA[:, j]``, ``shared`` is
``dB Ā[:, j]``. :func:`split_norms` gives both norms per channel. A signature that tracks ``shared`` is
re-ranking the finetune's own update (``benchmarks/signature_vs_delta.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..core.registry import CHANNEL_DIM, MLP_KINDS, Key
from ..weights.delta_io import Factors
from ..weights.factored import FactoredDelta


def twin_factors(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B_p, A_p, B_c, A_c)`` of one module's differential delta (two parts: ``+`` poisoned, ``−`` clean),
    each part's scale folded into its ``B``, signs removed: ``ΔW = B_p A_p − B_c A_c``."""
    if len(f.parts) != 2 or [g for _, _, g in f.parts] != [1, -1]:
        raise ValueError(
            f"a twin differential has two parts (+poisoned, −clean); got signs {[g for _, _, g in f.parts]}"
        )
    (r_p, s_p, _), (_, s_c, _) = f.parts
    B, A = f.B.double(), f.A.double()
    return B[:, :r_p] * s_p, A[:r_p], B[:, r_p:] * s_c, A[r_p:]


def split_norms(f: Factors, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(own, shared)`` norms per channel of ``kind`` (module doc); ``own + shared`` (as vectors) is the
    channel's slice of ``ΔW``. Shapes: ``[n_channels]`` each (d_ff for the MLP kinds)."""
    if kind not in CHANNEL_DIM:
        raise ValueError(f"kind={kind!r} has no channel axis; choose one of {sorted(CHANNEL_DIM)}")
    B_p, A_p, B_c, A_c = twin_factors(f)
    dB, dA, B_m, A_m = B_p - B_c, A_p - A_c, (B_p + B_c) / 2, (A_p + A_c) / 2
    if CHANNEL_DIM[kind] == 0:
        return (dB @ A_m).norm(dim=1), (B_m @ dA).norm(dim=1)
    return (B_m @ dA).norm(dim=0), (dB @ A_m).norm(dim=0)


def split_scores(
    deltas: Iterable[FactoredDelta],
) -> tuple[dict[Key, torch.Tensor], dict[Key, torch.Tensor]]:
    """Eq. 2's norm term computed on each part: ``(own, shared)``, ``(block, kind) → [d_ff]``, the mean over
    the N twin differentials ``deltas`` of each part's channel norms (MLP kinds only)."""
    own: dict[Key, torch.Tensor] = {}
    shared: dict[Key, torch.Tensor] = {}
    n = 0
    for d in deltas:
        if not isinstance(d, FactoredDelta):
            raise TypeError(
                f"split_scores needs factored twin deltas (adapter setting), got {type(d).__name__}"
            )
        n += 1
        for key, f in d.factors.items():
            if key[1] not in MLP_KINDS:
                continue
            o, s = split_norms(f, key[1])
            own[key] = own.get(key, 0) + o
            shared[key] = shared.get(key, 0) + s
    if not n:
        raise ValueError("split_scores: no twin deltas given")
    return {k: v / n for k, v in own.items()}, {k: v / n for k, v in shared.items()}
