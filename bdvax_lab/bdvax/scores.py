"""Eq. 2 channel scores: the norm and alignment terms of N differential deltas, streamed module by module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.artifacts import read_json
from ..core.registry import ATTN_KINDS, CHANNEL_DIM, MLP_KINDS, Key
from ..weights.delta_io import DELTA_JSON, DELTA_TENSORS
from ..weights.delta_layout import layout_summary
from ..weights.deltas import WeightDelta
from .config import SCORE_MODES
from .twins import _complete


# =========================================================================== scores
def terms_from_gram(
    gram: torch.Tensor, norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2's terms from per-channel Gram matrices ``gram`` [C, N, N] of the raw vectors (``gram[c, i, i'] =
    Δ_i[c]·Δ_i'[c]``); ``norms`` [C, N] defaults to the square root of the diagonal."""
    n = gram.shape[-1]
    if norms is None:
        norms = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(0).sqrt()
    norm_term = norms.mean(1)
    if n < 2:
        return norm_term, torch.zeros_like(norm_term)
    iu = torch.triu_indices(n, n, 1, device=gram.device)
    denom = norms[:, iu[0]] * norms[:, iu[1]]  # [C, P]
    dots = gram[:, iu[0], iu[1]]
    cos = torch.where(
        denom > 0, dots / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(dots)
    )
    return norm_term, cos.clamp(0.0, 1.0).mean(1)


def channel_terms(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2's two terms for ``vectors`` [N, C, D] (N variants, C channels, D entries per channel).

    Returns ``norm`` [C] = (1/N) Σ_i ‖v_i‖₂ and ``align`` [C] =
    (2 / (N(N−1))) Σ_{i<i'} max(0, cos(v_i, v_i')) (zero when N = 1). A zero
    vector has cosine 0 with everything. The per-pair clamp needs the explicit
    pairs: each channel's [N, N] Gram matrix is one batched matmul.
    """
    if vectors.dim() != 3:
        raise ValueError(f"channel_terms expects [N, C, D], got shape {tuple(vectors.shape)}")
    v = vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float()
    v = v.transpose(0, 1)  # [C, N, D]
    return terms_from_gram(torch.bmm(v, v.transpose(1, 2)), torch.linalg.vector_norm(v, dim=2))


def combine_terms(
    norm: torch.Tensor, align: torch.Tensor, score: str = "combined", lam: float = 0.01
) -> torch.Tensor:
    """S = norm + λ·align ("combined"), or one of the terms alone ("norm" / "align") for the ablations."""
    if score == "combined":
        return norm + lam * align
    if score == "norm":
        return norm.clone()
    if score == "align":
        return align.clone()
    raise ValueError(f"score={score!r}; choose one of {SCORE_MODES}")


class _Sources:
    """Single module tensors (or channel slices) of N cached deltas or in-memory WeightDeltas.

    Every read opens and closes its file: a safetensors handle kept open maps
    the whole file, and the touched pages of six 425 MB files then count as
    resident memory (3.5 GB measured for SmolLM2).
    """

    def __init__(self, sources: Sequence[WeightDelta | str | Path]) -> None:
        self.items: list[WeightDelta | Path] = []
        self.keys: list[set[Key]] = []
        self.layouts: list[dict[str, Any]] = []
        self.metas: list[dict[str, Any]] = []
        self.names: list[str] = []
        for src in sources:
            if isinstance(src, WeightDelta):
                self.items.append(src)
                self.keys.append(set(src.tensors))
                self.layouts.append(layout_summary(src.layout))
                self.metas.append(src.meta)
                self.names.append("<memory>")
                continue
            path = Path(src)
            if not _complete(path):
                raise FileNotFoundError(
                    f"{path}: not a complete cached twin delta (needs {DELTA_JSON} and {DELTA_TENSORS})"
                )
            try:
                manifest = read_json(path / DELTA_JSON)
                self.keys.append({(int(e["block"]), e["kind"]) for e in manifest["entries"]})
                self.layouts.append(dict(manifest["layout"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path / DELTA_JSON}: not a WeightDelta manifest ({exc})") from None
            self.items.append(path / DELTA_TENSORS)
            self.metas.append(manifest.get("meta") or {})
            self.names.append(str(path))
        if not self.items:
            raise ValueError("no twin deltas to score")
        for name, lay in zip(self.names[1:], self.layouts[1:]):
            if lay != self.layouts[0]:
                raise ValueError(f"{name}: layout differs from {self.names[0]} ({lay} vs {self.layouts[0]})")
        self.layout = self.layouts[0]

    def __len__(self) -> int:
        return len(self.items)

    def present(self, key: Key) -> bool:
        return any(key in k for k in self.keys)

    def read(
        self, i: int, key: Key, axis: int | None = None, lo: int = 0, hi: int | None = None
    ) -> torch.Tensor | None:
        """Module ``key`` of source ``i`` (None if absent), optionally sliced to ``lo:hi`` along ``axis``."""
        if key not in self.keys[i]:
            return None
        item = self.items[i]
        if isinstance(item, WeightDelta):
            t = item.tensors[key].detach().cpu()
            if axis is not None:
                t = t.narrow(axis, lo, (hi if hi is not None else t.shape[axis]) - lo)
            return t
        from safetensors import safe_open

        with safe_open(str(item), framework="pt", device="cpu") as f:
            name = f"block.{key[0]}.{key[1]}"
            if axis is None:
                return f.get_tensor(name)
            sl = f.get_slice(name)
            return sl[lo:hi] if axis == 0 else sl[:, lo:hi]


def _mlp_module_terms(
    src: _Sources, key: Key, chunk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm/align terms [d_ff] of one MLP module, ``chunk`` channels at a time, one buffer [C, N, D]."""
    lay, n = src.layout, len(src)
    d_ff, hidden = lay["d_ff"], lay["hidden"]
    axis = CHANNEL_DIM[key[1]]
    norms, aligns = [], []
    for lo in range(0, d_ff, chunk):
        hi = min(d_ff, lo + chunk)
        buf = torch.empty((hi - lo, n, hidden), dtype=torch.float32)
        for i in range(n):
            t = src.read(i, key, axis, lo, hi) if hi - lo < d_ff else src.read(i, key)
            if t is None:
                buf[:, i].zero_()
            else:
                buf[:, i].copy_(t if axis == 0 else t.t())  # down: column j is channel j
        buf = buf.to(device)
        a, b = terms_from_gram(torch.bmm(buf, buf.transpose(1, 2)), torch.linalg.vector_norm(buf, dim=2))
        norms.append(a.cpu())
        aligns.append(b.cpu())
        del buf
    return torch.cat(norms), torch.cat(aligns)


def _head_gram(src: _Sources, block: int, kinds: Sequence[str], device: torch.device) -> torch.Tensor | None:
    """Per-query-head Gram [n_heads, N, N] summed over the parts of each head (no concatenation needed).

    q rows ``h·hd:(h+1)·hd`` and o columns ``h·hd:(h+1)·hd`` belong to query
    head h; k/v rows of KV head g belong to every query head that reads it,
    ``g = h // (n_heads / n_kv_heads)`` (HF ``repeat_kv``).
    """
    lay, n = src.layout, len(src)
    nh, nkv, hd, hidden = lay["n_heads"], lay["n_kv_heads"], lay["head_dim"], lay["hidden"]
    group = torch.arange(nh) // max(1, nh // nkv)
    total = None
    for kind in kinds:
        if not src.present((block, kind)):
            continue
        heads = nh if kind in ("q", "o") else nkv
        buf = torch.empty((heads, n, hd * hidden), dtype=torch.float32)
        for i in range(n):
            t = src.read(i, (block, kind))
            if t is None:
                buf[:, i].zero_()
                continue
            t = t.float()
            if kind == "o":  # [hidden, nh·hd] → per head [hidden, hd]
                buf[:, i].copy_(t.reshape(hidden, nh, hd).permute(1, 0, 2).reshape(nh, hidden * hd))
            else:  # [heads·hd, hidden] → per head [hd, hidden]
                buf[:, i].copy_(t.reshape(heads, hd * hidden))
        buf = buf.to(device)
        g = torch.bmm(buf, buf.transpose(1, 2))  # [heads, N, N]
        if kind in ("k", "v"):
            g = g[group.to(device)]
        total = g if total is None else total + g
    return total


def compute_terms(
    sources: Sequence[WeightDelta | str | Path],
    *,
    head_kinds: Sequence[str] = ATTN_KINDS,
    chunk_bytes: int = 256 << 20,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Norm and alignment terms of every MLP channel (and attention head) from N differential deltas.

    ``sources``: cached twin directories (streamed: one module — or a channel
    slice of at most ``chunk_bytes`` across the N files — in memory at a time)
    or in-memory :class:`WeightDelta` objects. Channels: output rows of
    gate/up, input columns of down (``registry.CHANNEL_DIM``). Heads: query
    head ``h`` is scored on the concatenation of its q rows, its o columns and
    the k/v rows of the KV head it reads under GQA
    (``h // (n_heads / n_kv_heads)``, HF's ``repeat_kv`` mapping); heads of one
    KV group therefore share their k/v part (``head_kinds=("q", "o")`` scores
    query heads on their own rows/columns only). Modules absent in a variant
    count as zero; modules absent in every variant get no scores.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    src = _Sources(sources)
    lay = src.layout
    n = len(src)
    chunk = max(1, min(lay["d_ff"], chunk_bytes // max(1, n * lay["hidden"] * 4)))
    norm: dict[Key, torch.Tensor] = {}
    align: dict[Key, torch.Tensor] = {}
    mlp_keys = [(b, k) for b in range(lay["n_blocks"]) for k in MLP_KINDS if src.present((b, k))]
    for key in tqdm(mlp_keys, desc="channel scores", disable=not progress, leave=False):
        norm[key], align[key] = _mlp_module_terms(src, key, chunk, device)
    if not norm:
        raise ValueError("the twin deltas hold no MLP (gate/up/down) module: nothing to score")
    head_norm: dict[int, torch.Tensor] = {}
    head_align: dict[int, torch.Tensor] = {}
    kinds = [k for k in ATTN_KINDS if k in tuple(head_kinds)]
    for b in range(lay["n_blocks"]):
        gram = _head_gram(src, b, kinds, device) if kinds else None
        if gram is not None:
            head_norm[b], head_align[b] = (t.cpu() for t in terms_from_gram(gram))
    return {
        "norm": norm,
        "align": align,
        "head_norm": head_norm,
        "head_align": head_align,
        "layout": lay,
        "metas": src.metas,
        "names": src.names,
    }
