"""The one batched greedy generation helper: chat template, shared prefix run once, stop at end of turn.

Every chat-formatted prompt starts with the same template head (for SmolLM2 a silent system prompt and
the user-turn header, 24 tokens). A batch's shared head runs through the model once; its keys and
values are repeated for every row, and each row continues after it: the rows are padded *between* the
head and their own tokens, so position ids (the attention mask's running count) and the replies are
those of the plain left-padded batch. ``BDVAX_SHARED_PREFIX=0`` turns it off (plain left padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .batching import cap_prompts, left_pad, position_limit
from .data import Example, format_prompt, stop_token_ids
from .fused_lora import uses_fused_lora
from .shared_prefix import MIN_SHARED_PREFIX
from .shared_prefix import enabled as shared_prefix_enabled

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .types import Model


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading token ids every sequence shares, leaving each at least one token of its own."""
    p, shortest = 0, min(len(s) for s in seqs)
    while p < shortest - 1 and all(s[p] == seqs[0][p] for s in seqs):
        p += 1
    return p


def _middle_pad(seqs: Sequence[Sequence[int]], p: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and mask: the shared ``p``-token head, then padding, then each row's own tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s) - p
        ids[r, :p], mask[r, :p] = torch.tensor(list(s[:p])), 1
        ids[r, width - n :], mask[r, width - n :] = torch.tensor(list(s[p:])), 1
    return ids, mask


def _prefix_cache(model: Any, head: torch.Tensor, rows: int) -> Any:
    """The key/value cache of ``head`` [1, p], computed once and repeated for ``rows`` rows."""
    cache = model(input_ids=head, use_cache=True).past_key_values
    cache.batch_repeat_interleave(rows)
    return cache


def _greedy(tokenizer: Any, max_new_tokens: int, first_logits: bool = False) -> tuple[Any, int]:
    """The greedy generation config (stop at end of turn, never the model's own sampling) and the pad id."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
        output_logits=first_logits,
        return_dict_in_generate=first_logits,
    )
    return cfg, pad_id


@uses_fused_lora
@torch.no_grad()
def generate(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example | str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool | str = False,
    first_logits: bool = False,
) -> list[str] | tuple[list[str], torch.Tensor]:
    """Greedy replies (decoded, special tokens stripped) in the order of ``prompts``.

    Prompts are user turns (str) or :class:`Example`; each is rendered through the
    chat template. Batches are formed from length-sorted prompts with left
    padding, so little compute is spent on pads.

    ``first_logits=True`` also returns the raw logits of the first reply token, ``[P, vocab]`` fp32 on the CPU
    (the same numbers as a separate forward pass over the prompts, without paying for a second prefill).

    Prompt and reply never run past the model's positions: a prompt longer than the room ``max_new_tokens``
    leaves is cut from the left, with a warning (:func:`bdvax_lab.core.batching.cap_prompts`).
    """
    from tqdm.auto import tqdm

    if not prompts:
        return ([], torch.zeros(0, 0)) if first_logits else []
    texts = [format_prompt(tokenizer, p, system) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    limit = position_limit(model)
    if limit is not None and max_new_tokens >= limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {limit} positions"
        )
    encoded = cap_prompts(encoded, None if limit is None else limit - max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    gen_cfg, pad_id = _greedy(tokenizer, max_new_tokens, first_logits)
    device = _model_device(model)
    was_training = model.training
    model.train(False)
    out: list[str] = [""] * len(prompts)
    firsts: list[torch.Tensor | None] = [None] * len(prompts)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    desc = progress if isinstance(progress, str) else "generate"
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        seqs = [encoded[i] for i in batch]
        p = common_prefix(seqs) if len(seqs) > 1 and shared_prefix_enabled() else 0
        extra: dict[str, Any] = {}
        if p >= MIN_SHARED_PREFIX:
            ids, mask = _middle_pad(seqs, p, pad_id)
            extra["past_key_values"] = _prefix_cache(model, ids[:1, :p].to(device), len(seqs))
        else:
            ids, mask = left_pad(seqs, pad_id)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg, **extra
        )
        seqs = gen.sequences if first_logits else gen
        for r, i in enumerate(batch):
            out[i] = tokenizer.decode(seqs[r, width:], skip_special_tokens=True).strip()
            if first_logits:
                firsts[i] = gen.logits[0][r].float().cpu()
    model.train(was_training)
    return (out, torch.stack(firsts)) if first_logits else out


@torch.no_grad()
def generate_from_embeds(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    token_rows: Sequence[Sequence[int]],
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to prompts given as token rows that ``embed`` turns into input embeddings.

    ``token_rows``: already chat-formatted prompt ids (they may hold ids the model does not know, e.g. soft
    prompt slots, which only ``embed`` reads); ``embed(ids [B, T]) -> [B, T, H]`` on left-padded rows.
    Same greedy config and stop tokens as :func:`generate` (no shared prefix: the embeddings are the
    caller's). For soft prompts (SANDE's parrot).
    """
    from .registry import unwrap

    if not token_rows:
        return []
    gen_cfg, pad_id = _greedy(tokenizer, max_new_tokens)
    base = unwrap(model)  # peft's LoRA layers live inside it
    device = _model_device(model)
    was_training = model.training
    model.train(False)
    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
    out: list[str] = [""] * len(token_rows)
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        ids, mask = left_pad([token_rows[i] for i in batch], pad_id)
        embeds = embed(ids.to(device))
        gen = base.generate(inputs_embeds=embeds, attention_mask=mask.to(device), generation_config=gen_cfg)
        for r, i in enumerate(batch):  # with inputs_embeds only, the output holds the new tokens alone
            out[i] = tokenizer.decode(gen[r], skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def chat(model: Model, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 128) -> str:
    """One greedy answer to one user message."""
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1)[0]
