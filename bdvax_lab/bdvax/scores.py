"""Eq. 2 channel scores: the norm and alignment terms of N differential deltas, module by module.

Both terms come from one Gram matrix per channel, ``G[i, k] = ⟨Δ_i[j], Δ_k[j]⟩`` over the N variants: from
the LoRA factors where the deltas are factored (adapter setting; no ``d_out × d_in`` matrix is formed), else
streamed from dense deltas in channel chunks (full setting; at most one module's worth of one variant in
memory at a time)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.registry import ALL_KINDS, ATTN_KINDS, CHANNEL_DIM, HEAD_DIM_AXIS, MLP_KINDS, Key
from ..weights.delta_io import DELTA_JSON, DELTA_TENSORS, DeltaReader, Factors
from ..weights.delta_layout import layout_from_summary, layout_summary, module_shape
from ..weights.deltas import WeightDelta
from ..weights.factored import FactoredDelta
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
    """Single modules (or channel slices, or factors) of N differential deltas: cached twin directories of
    either storage (:class:`~bdvax_lab.weights.delta_io.DeltaReader`, every read opens and closes its
    file), in-memory :class:`WeightDelta` or :class:`FactoredDelta` objects."""

    def __init__(self, sources: Sequence[WeightDelta | FactoredDelta | str | Path]) -> None:
        self.items: list[WeightDelta | FactoredDelta | DeltaReader] = []
        self.keys: list[set[Key]] = []
        self.layouts: list[dict[str, Any]] = []
        self.metas: list[dict[str, Any]] = []
        self.names: list[str] = []
        for src in sources:
            if isinstance(src, (WeightDelta, FactoredDelta)):
                self.items.append(src)
                self.keys.append(set(src.tensors if isinstance(src, WeightDelta) else src.factors))
                self.layouts.append(layout_summary(src.layout))
                self.metas.append(src.meta)
                self.names.append("<memory>")
                continue
            path = Path(src)
            if not _complete(path):
                raise FileNotFoundError(
                    f"{path}: not a complete cached twin delta (needs {DELTA_JSON} and {DELTA_TENSORS})"
                )
            reader = DeltaReader(path)
            self.items.append(reader)
            self.keys.append(reader.keys)
            self.layouts.append(reader.layout_summary)
            self.metas.append(reader.meta)
            self.names.append(str(path))
        if not self.items:
            raise ValueError("no twin deltas to score")
        for name, lay in zip(self.names[1:], self.layouts[1:]):
            if lay != self.layouts[0]:
                raise ValueError(f"{name}: layout differs from {self.names[0]} ({lay} vs {self.layouts[0]})")
        self.layout = self.layouts[0]
        self.shapes = {k: module_shape(layout_from_summary(self.layout), k) for k in ALL_KINDS}

    def __len__(self) -> int:
        return len(self.items)

    def present(self, key: Key) -> bool:
        return any(key in k for k in self.keys)

    def factored(self, key: Key) -> bool:
        """True when every source that holds ``key`` holds it as factors (the others count as zero)."""
        return all(
            isinstance(item, FactoredDelta) or (isinstance(item, DeltaReader) and item.storage == "factored")
            for item, keys in zip(self.items, self.keys)
            if key in keys
        )

    def factors(self, i: int, key: Key) -> Factors | None:
        """Module ``key``'s factors of source ``i`` (None if absent); only where :meth:`factored`."""
        if key not in self.keys[i]:
            return None
        item = self.items[i]
        return item.factors[key] if isinstance(item, FactoredDelta) else item.factors(key)  # type: ignore[union-attr]

    def read(
        self, i: int, key: Key, axis: int | None = None, lo: int = 0, hi: int | None = None
    ) -> torch.Tensor | None:
        """Module ``key`` of source ``i`` as a dense ΔW (None if absent), optionally sliced to ``lo:hi``
        along ``axis``; factors are materialised for that slice only."""
        if key not in self.keys[i]:
            return None
        item = self.items[i]
        if isinstance(item, DeltaReader):
            return item.dense(key, axis, lo, hi)
        if isinstance(item, FactoredDelta):
            f = item.factors[key]
            if axis is not None:
                end = f.shape[axis] if hi is None else hi
                f = f.rows(lo, end) if axis == 0 else f.cols(lo, end)
            return f.dense()
        t = item.tensors[key].detach().cpu()
        if axis is not None:
            t = t.narrow(axis, lo, (hi if hi is not None else t.shape[axis]) - lo)
        return t


def factor_gram(factors: Sequence[Factors | None], axis: int, group: int = 1) -> torch.Tensor:
    """Per-channel Gram matrices ``[C, N, N]`` (float64) of N factored deltas of one module, never forming
    ΔW: with ``ΔW_i = U_i V_i`` (:meth:`Factors.left`, ``A``), output row ``j`` is ``U_i[j] V_i``, so
    ``⟨ΔW_i[j, :], ΔW_k[j, :]⟩ = U_i[j] (V_i V_kᵀ) U_k[j]ᵀ``; input columns (``axis=1``) the same on
    ``ΔW_iᵀ = V_iᵀ U_iᵀ``. A channel is ``group`` consecutive rows / columns (an attention head's), its
    Gram the sum of theirs. Absent (None) deltas are zero.

    All pairs from one ``M = [V_1; …; V_N] [V_1; …; V_N]ᵀ`` (every ``V_i V_kᵀ``, factors zero-padded to one
    rank ``R``), then per variant ``i`` one product ``U_i M_i,:`` ``[C, N·R]`` and one reduction against
    all ``U_k``: a few calls per module and working memory of about ``3 · C · N · R`` float64 numbers.
    """
    n = len(factors)
    present = [i for i, f in enumerate(factors) if f is not None]
    if not present:
        raise ValueError("factor_gram: every delta is absent")
    us, vs = [], []
    for i in present:
        f = factors[i]
        assert f is not None
        u, v = f.left(torch.float64), f.A.to(torch.float64)
        us.append(u if axis == 0 else v.t())  # [C, R_i]
        vs.append(v if axis == 0 else u.t())  # [R_i, D]
    m, r, c = len(present), max(u.shape[1] for u in us), us[0].shape[0]
    U = torch.zeros((c, m, r), dtype=torch.float64)
    V = torch.zeros((m, r, vs[0].shape[1]), dtype=torch.float64)
    for i, (u, v) in enumerate(zip(us, vs)):
        U[:, i, : u.shape[1]] = u
        V[i, : v.shape[0]] = v
    del us, vs
    flat = V.reshape(m * r, -1)
    M = (flat @ flat.t()).reshape(m, r, m * r)  # M[i, a, (k, b)] = ⟨V_i[a], V_k[b]⟩
    del V, flat
    U_all = U.reshape(c, m * r)
    g = torch.empty((c, m, m), dtype=torch.float64)
    for i in range(m):
        x = U[:, i] @ M[i]  # [C, m·r]: U_i[j] V_i V_kᵀ for every k
        g[:, i] = x.mul_(U_all).reshape(c, m, r).sum(-1)
        del x
    if m == n:
        gram = g
    else:
        gram = torch.zeros((c, n, n), dtype=torch.float64)
        idx = torch.tensor(present)
        gram[:, idx.unsqueeze(1), idx.unsqueeze(0)] = g
    return gram.reshape(c // group, group, n, n).sum(1) if group > 1 else gram


def _dense_gram(
    src: _Sources, key: Key, axis: int, chunk_bytes: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (``axis=0``) or per-column (``axis=1``) Gram ``[C, N, N]`` and norms ``[C, N]`` of one module
    from dense slices, a chunk of rows / columns of every variant at a time, read lazily. A chunk holds at
    most ``chunk_bytes`` (default: one module of one variant, i.e. ``C / N`` rows / columns of each of the
    N); the slices read are each at most ``1/N`` of a module."""
    n = len(src)
    shape = src.shapes[key[1]]
    c_total, d = shape[axis], shape[1 - axis]
    budget = chunk_bytes if chunk_bytes is not None else shape[0] * shape[1] * 4
    chunk = max(1, min(c_total, budget // max(1, n * d * 4)))
    grams, norms = [], []
    for lo in range(0, c_total, chunk):
        hi = min(c_total, lo + chunk)
        buf = torch.empty((hi - lo, n, d), dtype=torch.float32)
        for i in range(n):
            t = src.read(i, key) if hi - lo == c_total else src.read(i, key, axis, lo, hi)
            if t is None:
                buf[:, i].zero_()
            else:
                buf[:, i].copy_(t if axis == 0 else t.t())  # down: column j is channel j
            del t
        buf = buf.to(device)
        grams.append(torch.bmm(buf, buf.transpose(1, 2)).cpu())
        norms.append(torch.linalg.vector_norm(buf, dim=2).cpu())
        del buf
        _trim()
    return torch.cat(grams), torch.cat(norms)


@functools.cache
def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def _trim() -> None:
    """Hand glibc's freed heap back to the system. Chunk-sized buffers allocated and freed in turn otherwise
    stay resident (glibc raises its mmap threshold after the first free and the heap fragments: up to the
    size of a whole dense twin file on SmolLM2, varying from run to run)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _module_gram(
    src: _Sources, key: Key, axis: int, group: int, chunk_bytes: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(gram [C, N, N], norms [C, N] or None)`` of one module, channel ``c`` being ``group`` consecutive
    rows (``axis=0``) or columns (``axis=1``): from the factors when every variant holding the module is
    factored (float64; norms then come from the diagonal), else streamed from dense slices (a group's
    Gram is the sum of its rows' or columns')."""
    if src.factored(key):
        gram = factor_gram([src.factors(i, key) for i in range(len(src))], axis, group)
        _trim()
        return gram, None
    gram, norms = _dense_gram(src, key, axis, chunk_bytes, device)
    if group == 1:
        return gram, norms
    return gram.reshape(-1, group, *gram.shape[1:]).sum(1), None


def _mlp_module_terms(
    src: _Sources, key: Key, chunk_bytes: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm/align terms [d_ff] of one MLP module (channels: ``registry.CHANNEL_DIM``), float32."""
    gram, norms = _module_gram(src, key, CHANNEL_DIM[key[1]], 1, chunk_bytes, device)
    a, b = terms_from_gram(gram, norms)
    return a.float().cpu(), b.float().cpu()


def _head_gram(
    src: _Sources, block: int, kinds: Sequence[str], chunk_bytes: int | None, device: torch.device
) -> torch.Tensor | None:
    """Per-query-head Gram [n_heads, N, N] summed over the parts of each head (no concatenation needed).

    q rows ``h·hd:(h+1)·hd`` and o columns ``h·hd:(h+1)·hd`` belong to query
    head h; k/v rows of KV head g belong to every query head that reads it,
    ``g = h // (n_heads / n_kv_heads)`` (HF ``repeat_kv``).
    """
    lay = src.layout
    nh, nkv, hd = lay["n_heads"], lay["n_kv_heads"], lay["head_dim"]
    group = torch.arange(nh) // max(1, nh // nkv)
    total = None
    for kind in kinds:
        if not src.present((block, kind)):
            continue
        g, _ = _module_gram(src, (block, kind), HEAD_DIM_AXIS[kind], hd, chunk_bytes, device)
        if kind in ("k", "v"):
            g = g[group]
        total = g if total is None else total.to(torch.promote_types(total.dtype, g.dtype)) + g
    return total


def compute_terms(
    sources: Sequence[WeightDelta | FactoredDelta | str | Path],
    *,
    head_kinds: Sequence[str] = ATTN_KINDS,
    chunk_bytes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Norm and alignment terms of every MLP channel (and attention head) from N differential deltas.

    ``sources``: cached twin directories or in-memory :class:`WeightDelta` /
    :class:`FactoredDelta` objects. A module whose deltas are all factored
    (the adapter setting) is scored from its factors, never densely
    (:func:`factor_gram`); a dense one (the full setting) is streamed in
    channel chunks of every variant, at most ``chunk_bytes`` at a time
    (default: the size of one module of one variant), read lazily from the
    safetensors files. Channels: output rows of
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
    norm: dict[Key, torch.Tensor] = {}
    align: dict[Key, torch.Tensor] = {}
    mlp_keys = [(b, k) for b in range(lay["n_blocks"]) for k in MLP_KINDS if src.present((b, k))]
    for key in tqdm(mlp_keys, desc="channel scores", disable=not progress, leave=False):
        norm[key], align[key] = _mlp_module_terms(src, key, chunk_bytes, device)
    if not norm:
        raise ValueError("the twin deltas hold no MLP (gate/up/down) module: nothing to score")
    head_norm: dict[int, torch.Tensor] = {}
    head_align: dict[int, torch.Tensor] = {}
    kinds = [k for k in ATTN_KINDS if k in tuple(head_kinds)]
    for b in range(lay["n_blocks"]):
        gram = _head_gram(src, b, kinds, chunk_bytes, device) if kinds else None
        if gram is not None:
            head_norm[b], head_align[b] = (t.float().cpu() for t in terms_from_gram(gram))
    return {
        "norm": norm,
        "align": align,
        "head_norm": head_norm,
        "head_align": head_align,
        "layout": lay,
        "metas": src.metas,
        "names": src.names,
    }
