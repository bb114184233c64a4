"""Run the prompt prefix that every row of a batch shares through the decoder once, not once per row.

Every chat-formatted example starts with the same tokens: for SmolLM2 the
template's silent system prompt and the user-turn header, 24 tokens out of a
mean 59 in the short-response workload that attacks, twins and sanity checks
train on. Causal attention means those positions' hidden states do not depend
on what follows, so they need computing once per batch.

One model (:func:`packed_hidden`): the rows are packed into one sequence, the
prefix once and then each row's own tokens without padding, with a block mask
(each row sees the prefix and, causally, itself) and position ids that restart
each row after the prefix. One pass over ``P + Σ (len_b − P)`` positions
instead of ``B · T``; hidden states, losses and gradients agree with the plain
pass to float rounding (``tests/test_shared_prefix.py``). The shorter the
responses, the larger the prefix's share and the saving (on SmolLM2 about a
fifth of a batch-4 step with responses ≤ 16 tokens; ``RESULTS.md`` §3).

Co-trained adapters (``co``): rows of different adapters cannot share a prefix,
so the prefix runs in a pass of its own, one row per adapter, and each
adapter's keys and values are repeated over its own rows. That extra pass costs
about what a batch-4 prefix saves (it paid off at batch 8, not at batch 4 or 2),
so it is taken only where it saves at least :data:`MIN_SAVED_POSITIONS` positions.

``BDVAX_SHARED_PREFIX=0`` in the environment turns both off everywhere
(``benchmarks/train_speed.py`` measures both). Batches of one row, or whose
rows share fewer than :data:`MIN_SHARED_PREFIX` tokens, take the plain pass.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

#: a shared prefix shorter than this is never split off
MIN_SHARED_PREFIX = 8


#: token positions, ``(B − 1) · P``, a co-trained batch's prefix must save to pay for its own pass (see above)
MIN_SAVED_POSITIONS = 128


def enabled() -> bool:
    """False when ``BDVAX_SHARED_PREFIX=0`` asks for the plain one-pass forward everywhere."""
    return os.environ.get("BDVAX_SHARED_PREFIX", "1") != "0"


def cache_kwarg(decoder: Any) -> str:
    """The decoder's name for its KV cache argument.

    ``cache`` (transformers ≥ 5.2x) or ``past_key_values``.
    """
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


def _takes_custom_masks(decoder: Any) -> bool:
    """Packing needs an attention that honours an arbitrary 4D mask.

    sdpa and eager do, flash kernels do not.
    """
    return getattr(decoder.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def packed_hidden(
    decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, p: int
) -> torch.Tensor:
    """All rows in one packed sequence around their shared ``p``-token prefix; back to [B, T, H].

    The packed sequence is the prefix once, then each row's own tokens (no padding); a block mask lets
    each row attend to the prefix and causally to itself, and position ids restart each row at ``p``,
    so every row computes exactly what it would alone. One decoder pass over ``p + Σ (len_b − p)``
    positions instead of ``B · T``. Padded positions of the result repeat position 0 (they are never
    labelled).
    """
    b, t = input_ids.shape
    dev = input_ids.device
    lens = attention_mask.sum(1).tolist()
    pieces, segs, pos, index = (
        [input_ids[0, :p]],
        [torch.full((p,), -1, device=dev)],
        [torch.arange(p, device=dev)],
        [],
    )
    at = p
    for r in range(b):
        n = int(lens[r]) - p
        pieces.append(input_ids[r, p : p + n])
        segs.append(torch.full((n,), r, device=dev))
        pos.append(torch.arange(p, p + n, device=dev))
        row = torch.zeros(t, dtype=torch.long, device=dev)  # padding → position 0
        row[:p] = torch.arange(p, device=dev)
        row[p : p + n] = torch.arange(at, at + n, device=dev)
        index.append(row)
        at += n
    seg = torch.cat(segs)  # [T'], −1 = the shared prefix
    i = torch.arange(at, device=dev)
    allowed = (i[None, :] <= i[:, None]) & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))  # [T', T']
    dtype = next(decoder.parameters()).dtype
    mask = torch.zeros(at, at, dtype=dtype, device=dev).masked_fill_(~allowed, torch.finfo(dtype).min)
    hidden = decoder(
        input_ids=torch.cat(pieces)[None], attention_mask=mask[None, None], position_ids=torch.cat(pos)[None]
    ).last_hidden_state  # [1, T', H]
    return hidden[0][torch.stack(index)]  # [B, T, H]


def decoder_hidden(
    decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, co: Any = None
) -> torch.Tensor:
    """``decoder(input_ids, attention_mask).last_hidden_state`` [B, T, H], the shared prefix computed once.

    ``decoder`` is the base model's decoder stack (``get_decoder()``); the batch is right-padded, as
    :func:`bdvax_lab.data.collate` makes it. One model: the rows are packed around the prefix into one
    pass (:func:`packed_hidden`). ``co`` (a :class:`bdvax_lab.lora_fused.CoSpans`) says the rows belong to
    co-trained adapters, one row span each: the prefix then runs in a pass of its own, once per adapter
    (one row each), and each adapter's prefix keys and values serve its own rows only.
    """
    p = shared_prefix_length(input_ids, attention_mask) if enabled() else 0
    b = input_ids.shape[0]
    if p >= MIN_SHARED_PREFIX and co is None and _takes_custom_masks(decoder):
        return packed_hidden(decoder, input_ids, attention_mask, p)
    if p < MIN_SHARED_PREFIX or (b - 1) * p < MIN_SAVED_POSITIONS:
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    from transformers import DynamicCache

    kw = cache_kwarg(decoder)
    spans = co.spans
    firsts = torch.tensor([s for s, _ in spans], device=input_ids.device)  # one row per group
    with co.using(tuple((i, i + 1) for i in range(len(spans)))):
        head = decoder(
            input_ids=input_ids[firsts, :p],
            attention_mask=attention_mask[firsts, :p],
            use_cache=True,
            **{kw: DynamicCache(config=decoder.config)},
        )
    cache = head.cache if getattr(head, "cache", None) is not None else head.past_key_values
    owner = torch.repeat_interleave(
        torch.arange(len(spans), device=input_ids.device),
        torch.tensor([e - s for s, e in spans], device=input_ids.device),
    )  # [B]
    cache.batch_select_indices(owner)  # each row gets its own group's prefix keys and values
    tail = decoder(
        input_ids=input_ids[:, p:], attention_mask=attention_mask, use_cache=True, **{kw: cache}
    ).last_hidden_state  # [B, T − P, H]
    return torch.cat([head.last_hidden_state[owner], tail], 1)
