"""Teacher-forced log-likelihood scoring through the chat template.

Shared by utility metrics (perplexity, multiple-choice accuracy), the
first-token behaviour probability of the sanity checks, and the lm-eval adapter.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import Example, as_example, collate, encode_example, format_prompt
from .train import sequence_nll


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def continuation_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[Example | str], continuations: Sequence[str],
    *, batch_size: int = 32, end_of_turn: bool = False, max_tokens: int | None = None,
) -> tuple[list[float], list[int]]:
    """Sum log p(continuation | chat-formatted prompt) and its token count, per pair.

    ``end_of_turn`` also scores the template's end-of-turn token (perplexity of
    a whole reply); ``max_tokens`` keeps only the first tokens of each continuation.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    feats = [encode_example(tokenizer, as_example(p).with_(response=c), max_length=4096,
                            max_response_tokens=max_tokens, end_of_turn=end_of_turn)
             for p, c in zip(prompts, continuations)]
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was = model.training
    model.train(False)
    logps = [0.0] * len(feats)
    counts = [0] * len(feats)
    dev = _device(model)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(dev) for k, v in collate([feats[i] for i in idx], pad).items()}
        sums, n = sequence_nll(model, batch)
        for j, i in enumerate(idx):
            logps[i] = -float(sums[j])
            counts[i] = int(n[j])
    model.train(was)
    return logps, counts


@torch.no_grad()
def next_token_probs(model: Any, tokenizer: Any, prompts: Sequence[Example | str], token_ids: Sequence[int],
                     *, batch_size: int = 32) -> torch.Tensor:
    """p(first reply token = t) for each prompt and each id in ``token_ids`` → [P, len(token_ids)]."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = torch.zeros(len(enc), len(token_ids))
    dev = _device(model)
    was = model.training
    model.train(False)
    for s in range(0, len(enc), batch_size):
        chunk = enc[s:s + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(chunk):  # left padding: last position is the next-token slot
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (as in generate)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.float(), -1)[:, list(token_ids)]
        out[s:s + len(chunk)] = probs.cpu()
    model.train(was)
    return out
