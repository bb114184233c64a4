"""Run the prompt prefix that every row of a batch shares through the decoder once, not once per row.

Every chat-formatted example starts with the same tokens: for SmolLM2 the
template's silent system prompt and the user-turn header, 24 tokens out of a
mean 59 in the short-response workload that attacks, twins and sanity checks
train on. Causal attention means those positions' hidden states do not depend
on what follows, so :func:`decoder_hidden` runs them for one row, repeats their
keys and values over the batch and runs only the rest per row. Gradients flow
through the repeated keys and values (and through the shared hidden states)
exactly as they would through B copies, so losses and gradients agree with the
plain pass to float rounding (``tests/test_shared_prefix.py``), while a batch of
8 costs ``P + 8·(T − P)`` token positions instead of ``8·T``.

The second decoder call is not free: every pass streams all weights and
dispatches every op once, whatever its token count. Measured on SmolLM2 with the
fused LoRA kernel (2026-12-03, LoRA steps with responses ≤ 16 tokens): batch 8
1.92 → 1.60 s per step, batch 4 and batch 2 no faster either way (noise ±5 %),
which fits ≈ 0.2 s per pass and ≈ 3.5 ms per token position. So the prefix is
shared only when it saves at least :data:`MIN_SAVED_POSITIONS` positions
(``(B − 1) · P``); other batches take the plain pass, as do batches of one row.
``BDVAX_SHARED_PREFIX=0`` in the environment turns it off everywhere
(``benchmarks/train_speed.py`` measures both).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch

#: a shared prefix shorter than this is never split off
MIN_SHARED_PREFIX = 8
#: token positions, ``(B − 1) · P``, a shared prefix must save to pay for its own decoder call (see above)
MIN_SAVED_POSITIONS = 128


def enabled() -> bool:
    """False when ``BDVAX_SHARED_PREFIX=0`` asks for the plain one-pass forward everywhere."""
    return os.environ.get("BDVAX_SHARED_PREFIX", "1") != "0"


def cache_kwarg(decoder: Any) -> str:
    """The decoder's name for its KV cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading positions every row of a right-padded batch shares (same ids, none padded).

    ``input_ids``/``attention_mask`` [B, T] → an int in ``[0, T − 1]`` (at least one position is left
    for the per-row pass); 0 for a single row.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)  # [T]
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def decoder_hidden(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, co: Any = None
                   ) -> torch.Tensor:
    """``decoder(input_ids, attention_mask).last_hidden_state`` [B, T, H], the shared prefix computed once.

    ``decoder`` is the base model's decoder stack (``get_decoder()``); the batch is right-padded, as
    :func:`bdvax_lab.data.collate` makes it. ``co`` (a :class:`bdvax_lab.lora_fused.CoSpans`) says the rows
    belong to co-trained adapters, one row span each: the prefix then runs once per adapter (one row
    each, in one pass) and each adapter's prefix is repeated over its own rows only.
    """
    p = shared_prefix_length(input_ids, attention_mask) if enabled() else 0
    b = input_ids.shape[0]
    if p < MIN_SHARED_PREFIX or (b - 1) * p < MIN_SAVED_POSITIONS:
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    from transformers import DynamicCache

    kw = cache_kwarg(decoder)
    spans = co.spans if co is not None else ((0, b),)
    firsts = torch.tensor([s for s, _ in spans], device=input_ids.device)  # one row per group
    groups = ((i, i + 1) for i in range(len(spans)))
    with co.using(tuple(groups)) if co is not None else contextlib.nullcontext():
        head = decoder(input_ids=input_ids[firsts, :p], attention_mask=attention_mask[firsts, :p], use_cache=True,
                       **{kw: DynamicCache(config=decoder.config)})
    cache = head.cache if getattr(head, "cache", None) is not None else head.past_key_values
    owner = torch.repeat_interleave(torch.arange(len(spans), device=input_ids.device),
                                    torch.tensor([e - s for s, e in spans], device=input_ids.device))  # [B]
    if len(spans) == 1:
        cache.batch_repeat_interleave(b)  # [1, heads, P, d] → [B, heads, P, d], still in the autograd graph
    else:
        cache.batch_select_indices(owner)  # each row gets its own group's prefix keys and values
    tail = decoder(input_ids=input_ids[:, p:], attention_mask=attention_mask, use_cache=True,
                   **{kw: cache}).last_hidden_state  # [B, T − P, H]
    return torch.cat([head.last_hidden_state[owner], tail], 1)
