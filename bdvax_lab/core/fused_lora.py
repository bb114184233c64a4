"""A fused forward/backward for peft LoRA linears: the same math as peft, fewer and cheaper kernels.

peft computes ``y = W x + (B (A x)) · s`` as five autograd ops: base linear, two
rank-r linears, a scalar multiply and an add, each of the last two a full
``[N, out]`` elementwise pass forward and backward. :class:`LoraLinearFn` does
one ``addmm_`` with ``alpha = s`` instead of the multiply and the add, computes
the rank-r gradients in the layouts MKL runs fastest (``(Bᵀ gᵀ)ᵀ``, ``(hᵀ g)ᵀ``),
and skips the input gradient where nothing upstream needs it (the first
block's inputs). Results agree with peft's to float rounding (≈1e-7). For
SmolLM2 on a CPU that is 7–12 % less time per LoRA step at batch 4–8, and less
memory held for the backward pass (``RESULTS.md`` §3, ``benchmarks/train_speed.py``).

:func:`fused_lora` swaps it in for the modules it can serve exactly — one
active plain LoRA adapter, no dropout while training, frozen plain
``nn.Linear`` base, not merged — and restores the forward it found (peft's, or an instance forward such
as nnsight's controller) on exit. Any
other module, or a call peft must handle itself (``adapter_names``, a
disabled or merged adapter), keeps peft's code path. ``BDVAX_FUSED_LORA=0`` in
the environment turns it off everywhere (``benchmarks/train_speed.py`` measures
both). The same function serves several adapters on disjoint batch rows:
:func:`co_lora` co-trains LoRA models that share one frozen base
(:func:`bdvax_lab.training.loop.finetune_together`).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .types import Model

_FUSED_ATTR = "_bdvax_fused_lora"


def enabled() -> bool:
    """False when ``BDVAX_FUSED_LORA=0`` asks for peft's own LoRA forward everywhere."""
    return os.environ.get("BDVAX_FUSED_LORA", "1") != "0"


class LoraLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` plus, on the batch rows ``spans[k] = (start, end)``, ``s_k · (x A_kᵀ) B_kᵀ``.

    One adapter over the whole batch is the ordinary LoRA linear (``spans = ((0, B),)``); several adapters
    over disjoint row spans train several LoRA models that share one frozen base in one pass
    (:func:`co_lora`). Gradients for ``x`` and every ``A_k``, ``B_k`` (``W``, ``b`` frozen).

    Shapes: ``x`` [B, ..., in], ``W`` [out, in], ``A_k`` [r, in], ``B_k`` [out, r] → ``y`` [B, ..., out].
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spans: tuple[tuple[int, int], ...],
        scalings: tuple[float, ...],
        *ab: torch.Tensor,
    ) -> torch.Tensor:
        per_row = x[:1].numel() // x.shape[-1] if x.dim() > 1 else 1  # flattened positions per batch row
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # [N, out]
        hs = []
        for k, (s, e) in enumerate(spans):
            a, b = ab[2 * k], ab[2 * k + 1]
            h = x2[s * per_row : e * per_row] @ a.t()  # [n_k, r]
            y[s * per_row : e * per_row].addmm_(h, b.t(), alpha=scalings[k])
            hs.append(h)
        ctx.save_for_backward(x2, weight, *ab, *hs)
        ctx.spans, ctx.scalings, ctx.per_row, ctx.shape = spans, scalings, per_row, x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, *rest = ctx.saved_tensors
        n = len(ctx.spans)
        ab, hs = rest[: 2 * n], rest[2 * n :]
        g2 = grad.reshape(-1, grad.shape[-1])  # [N, out]
        gx = g2 @ weight if ctx.needs_input_grad[0] else None  # [N, in]
        gab: list[torch.Tensor | None] = []
        for k, (s, e) in enumerate(ctx.spans):
            lo, hi, sc = s * ctx.per_row, e * ctx.per_row, ctx.scalings[k]
            a, b, h, g = ab[2 * k], ab[2 * k + 1], hs[k], g2[lo:hi]
            gh = (b.t() @ g.t()).t()  # [n_k, r] = g B, in the faster layout
            if gx is not None:
                gx[lo:hi].addmm_(gh, a, alpha=sc)
            gab.append((gh.t() @ x2[lo:hi]).mul_(sc) if ctx.needs_input_grad[5 + 2 * k] else None)  # [r, in]
            gab.append((h.t() @ g).t().mul_(sc) if ctx.needs_input_grad[6 + 2 * k] else None)  # [out, r]
        return (gx.view(ctx.shape) if gx is not None else None), None, None, None, None, *gab


def _servable(module: Any) -> str | None:
    """The active adapter name if ``module`` is a LoRA linear this kernel reproduces exactly, else None."""
    if module.merged or module.disable_adapters or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if (
        name not in module.lora_A
        or name in getattr(module, "lora_variant", {})
        or getattr(module, "use_dora", {}).get(name)
    ):
        return None
    base = module.base_layer
    if type(base) is not torch.nn.Linear or getattr(module, "fan_in_fan_out", False):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _servable(self) if not args and not kwargs else None
    dropout = self.lora_dropout[name] if name is not None else None
    if name is None or (self.training and not isinstance(dropout, torch.nn.Identity) and dropout.p > 0):
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    base = self.base_layer
    spans = ((0, x.shape[0] if x.dim() > 1 else 1),)
    return LoraLinearFn.apply(x, base.weight, base.bias, spans, (float(self.scaling[name]),), a, b)


@contextlib.contextmanager
def fused_lora(model: Model) -> Iterator[int]:
    """Use :class:`LoraLinearFn` for every LoRA linear of ``model`` inside the block; yields how many.

    Re-entrant: modules already fused by an outer block are left to it. A model without
    LoRA layers passes through untouched (yields 0).
    """
    try:
        layers = _lora_linears(model) if enabled() else {}
    except ImportError:  # peft missing: nothing to fuse
        layers = {}
    patched = [m for m in layers.values() if not getattr(m, _FUSED_ATTR, False)]
    saved = {}
    for m in patched:
        saved[id(m)] = m.__dict__.get("forward")  # e.g. nnsight's controller: put back on exit
        m.forward = types.MethodType(_fused_forward, m)
        setattr(m, _FUSED_ATTR, True)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop(_FUSED_ATTR, None)
            if saved[id(m)] is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = saved[id(m)]


def uses_fused_lora(fn: Any) -> Any:
    """Decorator: run ``fn(model, ...)`` inside :func:`fused_lora` of its first argument."""
    import functools

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        with fused_lora(model):
            return fn(model, *args, **kwargs)

    return wrapper


def _lora_linears(model: Any) -> dict[str, Any]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def check_co_trainable(models: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``models`` are LoRA models :func:`co_lora` can run in one pass.

    That is: the same LoRA linears by name, each servable by :class:`LoraLinearFn` (one active plain
    adapter, no dropout, frozen ``nn.Linear`` base), all over the very same frozen base tensors
    (:func:`bdvax_lab.models.working_copy` with ``share_frozen_base=True`` makes such copies).
    """
    layers = [_lora_linears(m) for m in models]
    if not layers[0]:
        raise ValueError("co-training needs LoRA models; model 0 has no LoRA linear")
    for k, lay in enumerate(layers):
        if lay.keys() != layers[0].keys():
            raise ValueError(f"model {k} has other LoRA linears than model 0")
        for name, m in lay.items():
            adapter = _servable(m)
            if (
                adapter is None
                or not isinstance(m.lora_dropout[adapter], torch.nn.Identity)
                and m.lora_dropout[adapter].p > 0
            ):
                raise ValueError(
                    f"model {k}: {name} is not a plain single-adapter LoRA linear without dropout"
                )
            if m.base_layer.weight is not layers[0][name].base_layer.weight:
                raise ValueError(
                    f"model {k}: {name} does not share model 0's frozen base weight; make the copies "
                    "with working_copy(model, share_frozen_base=True)"
                )
    base_ids = lambda mod: {id(p) for n, p in mod.named_parameters() if "lora_" not in n}
    if any(base_ids(m) != base_ids(models[0]) for m in models[1:]):
        raise ValueError("co-trained models must share every frozen tensor (norms, embeddings too)")


class CoSpans:
    """Which batch rows each co-trained adapter serves; :func:`co_lora`'s layers read ``spans`` at call time,
    so a pass over other rows (the shared prefix, one row per adapter) can swap them in and out."""

    def __init__(self, spans: Sequence[tuple[int, int]]) -> None:
        self.spans = tuple((int(s), int(e)) for s, e in spans)

    @contextlib.contextmanager
    def using(self, spans: Sequence[tuple[int, int]]) -> Iterator[None]:
        saved, self.spans = self.spans, tuple((int(s), int(e)) for s, e in spans)
        try:
            yield
        finally:
            self.spans = saved


@contextlib.contextmanager
def co_lora(models: Sequence[Any], spans: Sequence[tuple[int, int]]) -> Iterator[CoSpans]:
    """Run ``models[k]``'s adapter on batch rows ``spans[k]`` of a forward pass of ``models[0]``.

    Yields the :class:`CoSpans` the patched layers read (pass it to ``sequence_nll(..., co=...)`` so the
    shared prompt prefix runs once per adapter). The models must pass :func:`check_co_trainable`:
    everything but their LoRA ``A``/``B`` is shared, so rows never see another model's weights and each
    model's gradients land in its own ``A``/``B``. One pass over K row groups streams the frozen weights
    once instead of K times (see ``signature.train_twins``).
    """
    layers = [_lora_linears(m) for m in models]
    co = CoSpans(spans)
    host = layers[0]
    saved = {}
    for name, m in host.items():
        mods = [lay[name] for lay in layers]

        def forward(
            self: Any, x: torch.Tensor, *args: Any, _mods: list = mods, **kwargs: Any
        ) -> torch.Tensor:
            ab: list[torch.Tensor] = []
            scalings = []
            for mod in _mods:
                adapter = mod.active_adapters[0]
                ab += [mod.lora_A[adapter].weight, mod.lora_B[adapter].weight]
                scalings.append(float(mod.scaling[adapter]))
            x = x.to(ab[0].dtype) if x.dtype != ab[0].dtype else x
            return LoraLinearFn.apply(
                x, self.base_layer.weight, self.base_layer.bias, co.spans, tuple(scalings), *ab
            )

        saved[name] = m.__dict__.get("forward")
        m.forward = types.MethodType(forward, m)
    try:
        yield co
    finally:
        for name, m in host.items():
            if saved[name] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = saved[name]
