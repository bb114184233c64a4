"""A fused forward/backward for peft LoRA linears: the same math as peft, fewer and cheaper kernels.

peft computes ``y = W x + (B (A x)) · s`` as five autograd ops: base linear, two
rank-r linears, a scalar multiply and an add, each of the last two a full
``[N, out]`` elementwise pass forward and backward. On a 2-core CPU and
SmolLM2 these passes and the rank-8 GEMMs in their slow memory layouts cost
about a third of a LoRA training step. :class:`LoraLinearFn` does one
``addmm_`` with ``alpha = s`` instead of the multiply and the add, computes the
rank-r gradients in the layouts MKL runs fastest (``(Bᵀ gᵀ)ᵀ``, ``(hᵀ g)ᵀ``),
and skips the input gradient where nothing upstream needs it (the first
block's inputs). Results agree with peft's to float rounding (≈1e-7).

:func:`fused_lora` swaps it in for the modules it can serve exactly — one
active plain LoRA adapter, no dropout while training, frozen plain
``nn.Linear`` base, not merged — and restores peft's forward on exit. Any
other module, or a call peft must handle itself (``adapter_names``, a
disabled or merged adapter), keeps peft's code path. ``BDVAX_FUSED_LORA=0`` in
the environment turns it off everywhere (``benchmarks/train_speed.py`` measures
both).
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Iterator

import torch

_FUSED_ATTR = "_bdvax_fused_lora"


def enabled() -> bool:
    """False when ``BDVAX_FUSED_LORA=0`` asks for peft's own LoRA forward everywhere."""
    return os.environ.get("BDVAX_FUSED_LORA", "1") != "0"


class LoraLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with gradients for ``x``, ``A`` and ``B`` (``W``, ``b`` frozen).

    Shapes: ``x`` [..., in], ``W`` [out, in], ``A`` [r, in], ``B`` [out, r] → ``y`` [..., out].
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        h = x2 @ lora_a.t()  # [N, r]
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # [N, out]
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        ctx.lead = lead
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, lora_a, lora_b, h = ctx.saved_tensors
        s = ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])  # [N, out]
        gh = (lora_b.t() @ g2.t()).t()  # [N, r] = g B, in the faster layout
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ weight).addmm_(gh, lora_a, alpha=s).view(*ctx.lead, weight.shape[1])  # [..., in]
        if ctx.needs_input_grad[3]:
            ga = (gh.t() @ x2).mul_(s)  # [r, in]
        if ctx.needs_input_grad[4]:
            gb = (h.t() @ g2).t().mul_(s)  # [out, r]
        return gx, None, None, ga, gb, None


def _servable(module: Any) -> str | None:
    """The active adapter name if ``module`` is a LoRA linear this kernel reproduces exactly, else None."""
    if module.merged or module.disable_adapters or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
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
    return LoraLinearFn.apply(x, base.weight, base.bias, a, b, float(self.scaling[name]))


@contextlib.contextmanager
def fused_lora(model: Any) -> Iterator[int]:
    """Use :class:`LoraLinearFn` for every LoRA linear of ``model`` inside the block; yields how many.

    Re-entrant: modules already fused by an outer block are left to it. A model without
    LoRA layers passes through untouched (yields 0).
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # peft missing: nothing to fuse
        LoraLinear = None
    if LoraLinear is None or not enabled():
        yield 0
        return
    patched = [m for m in model.modules() if isinstance(m, LoraLinear) and not getattr(m, _FUSED_ATTR, False)]
    for m in patched:
        m.forward = types.MethodType(_fused_forward, m)
        setattr(m, _FUSED_ATTR, True)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
            m.__dict__.pop(_FUSED_ATTR, None)


def uses_fused_lora(fn: Any) -> Any:
    """Decorator: run ``fn(model, ...)`` inside :func:`fused_lora` of its first argument."""
    import functools

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        with fused_lora(model):
            return fn(model, *args, **kwargs)

    return wrapper
