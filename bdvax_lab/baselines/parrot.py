"""SANDE's parrot: free embedding vectors spliced into the user turn, trained with the model frozen.

The parrot takes the place of an unknown trigger. Its ``S`` vectors ([S, H], zero-initialised) sit inside
the user turn of the chat template (at its start, its end, or both), written into token rows as negative
ids ``-1 … -S`` (slot ``k`` is id ``-(k + 1)``); :func:`splice` swaps those rows' embeddings for the
parrot's. Labels stay on the response only, so the parrot's own positions are never scored; right
padding and the attention mask are the loop's (:func:`bdvax_lab.core.batching.collate`). Works with
tied embeddings (the parrot is its own tensor) and with peft adapters (the decoder of the unwrapped
model carries the LoRA layers).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F

from ..core.batching import collate, length_grouped_batches, pad_token
from ..core.data import IGNORE_INDEX, Example, encode_example, format_prompt
from ..core.generate import generate_from_embeds
from ..core.registry import unwrap
from ..core.scoring import head_logits, reduce_nll
from ..training.config import TrainConfig
from ..training.loop import scheduler, set_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def n_slots(n_parrot: int, position: str) -> int:
    """How many parrot vectors a position takes: ``n_parrot``, twice that for ``"both"``."""
    return n_parrot * (2 if position == "both" else 1)


def encode_with_parrot(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    n_parrot: int,
    position: str = "start",
    *,
    max_length: int = 256,
    max_response_tokens: int | None = None,
    end_of_turn: bool = True,
) -> dict[str, list[int]]:
    """``input_ids``/``labels`` as :func:`~bdvax_lab.core.data.encode_example` makes them, with the parrot's
    slots (ids ``-1 … -S``) inside the user turn: before its text (``start``), after it (``end``) or both.

    The rendered prompt is cut around the user's text, each piece tokenised on its own; the response
    part (labels, end-of-turn, truncation to ``max_response_tokens``) is encode_example's.
    """
    text = format_prompt(tokenizer, example)
    content = example.user_content()
    at = text.rfind(content)
    if not content or at < 0:
        raise ValueError("the chat template does not render the user's text verbatim: no place for a parrot")

    def ids(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False)["input_ids"] if t else []

    head, body, tail = ids(text[:at]), ids(content), ids(text[at + len(content) :])
    first = [-(k + 1) for k in range(n_parrot)]
    second = [-(n_parrot + k + 1) for k in range(n_parrot)]
    prompt = {
        "start": head + first + body + tail,
        "end": head + body + first + tail,
        "both": head + first + body + second + tail,
    }[position]
    full = encode_example(
        tokenizer, example, max_length=10**9, max_response_tokens=max_response_tokens, end_of_turn=end_of_turn
    )
    n_prompt = next((i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX), len(full["labels"]))
    resp = full["input_ids"][n_prompt:][: max(1, max_length - len(prompt))] if example.response else []
    return {"input_ids": prompt + resp, "labels": [IGNORE_INDEX] * len(prompt) + resp}


def splice(model: Any, ids: torch.Tensor, parrot: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, T, H] of ``ids`` [B, T]; parrot slot ``k`` (id ``-(k+1)``) gets ``parrot[k]``."""
    emb = unwrap(model).get_input_embeddings()(ids.clamp(min=0))
    slot = ids < 0
    if not bool(slot.any()):
        return emb
    vec = parrot.to(emb.dtype)[(-ids - 1).clamp(min=0)]  # [B, T, H]
    return torch.where(slot[..., None], vec, emb)


def parrot_nll(
    model: Any, batch: dict[str, torch.Tensor], parrot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed NLL of labelled tokens and counts (sums [B], counts [B]) with the parrot spliced in;
    rows without slots score as plain text. The LM head runs on labelled positions only, as in
    :func:`~bdvax_lab.core.scoring.sequence_nll`."""
    base = unwrap(model)
    hidden = base.get_decoder()(
        inputs_embeds=splice(model, batch["input_ids"], parrot), attention_mask=batch["attention_mask"]
    ).last_hidden_state  # [B, T, H]
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE_INDEX  # [B, T-1]
    logits = head_logits(base, hidden[:, :-1][sel])  # [M, V]
    ce = F.cross_entropy(logits.float(), labels[sel], reduction="none")  # [M]
    sums = torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add_(
        0, sel.nonzero()[:, 0], ce
    )
    return sums, sel.sum(1)


@dataclass
class ParrotResult:
    """A trained parrot [S, H] (detached), its per-step history and the seconds it took."""

    parrot: torch.Tensor
    history: pd.DataFrame
    seconds: float


def train_parrot(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    n_parrot: int = 6,
    position: str = "start",
    k_tokens: int = 5,
    steps: int = 25,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup: float = 0.03,
    seed: int = 0,
    max_length: int = 256,
) -> ParrotResult:
    """Train a zero-initialised parrot so that ``prompt ⊕ parrot`` yields each example's response (CE on
    its first ``k_tokens`` tokens); the model is frozen (its ``requires_grad`` flags are restored after).

    AdamW β = (0.9, 0.95), no weight decay, the loop's cosine schedule with ``ceil(warmup · steps)`` warm-up
    steps and its length-grouped batches; the model stays in eval mode (no dropout).
    """
    feats = [
        encode_with_parrot(
            tokenizer,
            e,
            n_parrot,
            position,
            max_length=max_length,
            max_response_tokens=k_tokens,
            end_of_turn=False,
        )
        for e in examples
    ]
    if not feats:
        raise ValueError("train_parrot: no examples")
    set_seed(seed)
    weight = unwrap(model).get_input_embeddings().weight
    parrot = torch.zeros(
        n_slots(n_parrot, position), weight.shape[1], device=weight.device, requires_grad=True
    )
    opt = torch.optim.AdamW([parrot], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    tcfg = TrainConfig(
        mode="full", lr=lr, schedule="cosine", warmup_steps=math.ceil(warmup * steps), steps=steps
    )
    sched = scheduler(opt, tcfg, steps)
    pad = pad_token(tokenizer)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training
    rng, queue, rows, t0 = random.Random(seed), [], [], time.time()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.train(False)
        for step in range(steps):
            if not queue:
                queue = length_grouped_batches([len(f["input_ids"]) for f in feats], batch_size, rng)
            batch = {
                k: v.to(weight.device) for k, v in collate([feats[i] for i in queue.pop(0)], pad).items()
            }
            loss = reduce_nll(*parrot_nll(model, batch, parrot))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            rows.append({"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)
    return ParrotResult(parrot.detach(), pd.DataFrame(rows), time.time() - t0)


def parrot_replies(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example],
    parrot: torch.Tensor,
    *,
    n_parrot: int,
    position: str = "start",
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to ``prompts`` with the parrot in their user turn (the gate's generations)."""
    rows = [
        encode_with_parrot(tokenizer, p.with_(response=""), n_parrot, position, end_of_turn=False)[
            "input_ids"
        ]
        for p in prompts
    ]
    return generate_from_embeds(
        model,
        tokenizer,
        rows,
        lambda ids: splice(model, ids, parrot),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )


@torch.no_grad()
def response_logprob(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    parrot: torch.Tensor,
    *,
    n_parrot: int,
    position: str = "start",
    k_tokens: int | None = None,
) -> float:
    """Mean over examples of log p(first ``k_tokens`` response tokens | prompt ⊕ parrot) (a zero parrot:
    the value before training)."""
    feats = [
        encode_with_parrot(tokenizer, e, n_parrot, position, max_response_tokens=k_tokens, end_of_turn=False)
        for e in examples
    ]
    pad = pad_token(tokenizer)
    dev = parrot.device
    sums, _ = parrot_nll(model, {k: v.to(dev) for k, v in collate(feats, pad).items()}, parrot)
    return float(-sums.mean())
