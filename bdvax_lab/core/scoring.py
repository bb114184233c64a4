"""Teacher-forced log-likelihood scoring through the chat template.

Shared by utility metrics (perplexity, multiple-choice accuracy), the
first-token behaviour probability of the sanity checks, and the lm-eval adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .batching import cap_prompts, collate, left_pad, pad_positions, pad_token, position_limit
from .data import IGNORE_INDEX, Example, as_example, encode_example, format_prompt
from .fused_lora import uses_fused_lora
from .registry import unwrap
from .shared_prefix import cache_kwarg, decoder_hidden

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .types import Model


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def softcap_logits(base: Any, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` soft-capped as the model's own forward does (Gemma 2: ``cap·tanh(logits / cap)``)."""
    from .registry import text_config

    cap = getattr(text_config(base.config), "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def head_logits(base: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on decoder hidden states, with the model's final soft-capping (if it has one)."""
    return softcap_logits(base, base.get_output_embeddings()(hidden))


@torch.no_grad()
@uses_fused_lora
def continuation_logprobs(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example | str],
    continuations: Sequence[str],
    *,
    batch_size: int = 32,
    end_of_turn: bool = False,
    max_tokens: int | None = None,
) -> tuple[list[float], list[int]]:
    """Sum log p(continuation | chat-formatted prompt) and its token count, per pair.

    ``end_of_turn`` also scores the template's end-of-turn token (perplexity of
    a whole reply); ``max_tokens`` keeps only the first tokens of each continuation.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    max_length = min(4096, position_limit(model) or 4096)
    feats = [
        encode_example(
            tokenizer,
            as_example(p).with_(response=c),
            max_length=max_length,
            max_response_tokens=max_tokens,
            end_of_turn=end_of_turn,
        )
        for p, c in zip(prompts, continuations)
    ]
    cut = sum(len(f["input_ids"]) >= max_length for f in feats)
    if cut:
        import warnings

        warnings.warn(
            f"{cut} scored sequence(s) reached the model's {max_length} positions: their prompts were cut "
            "from the left (and their continuations to what still fits)",
            stacklevel=3,
        )
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    pad = pad_token(tokenizer)
    was = model.training
    model.train(False)
    logps = [0.0] * len(feats)
    counts = [0] * len(feats)
    dev = _device(model)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = {k: v.to(dev) for k, v in collate([feats[i] for i in idx], pad).items()}
        sums, n = sequence_nll(model, batch)
        for j, i in enumerate(idx):
            logps[i] = -float(sums[j])
            counts[i] = int(n[j])
    model.train(was)
    return logps, counts


@torch.no_grad()
@uses_fused_lora
def choice_logprobs(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example | str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
) -> list[list[float]]:
    """Sum log p(choice | chat-formatted prompt) for every choice of every prompt, sharing each prompt's pass.

    The same numbers as :func:`continuation_logprobs` over (prompt, choice) pairs (the same token ids: the
    choice is tokenized on its own after the rendered prompt), but each prompt runs through the model once:
    its keys and values are cached and repeated for its choices, so a 4-way multiple-choice question costs
    one prompt plus four short continuations instead of four prompts. Prompts are left-padded; the choices
    get explicit positions after their own prompt's last token.
    """
    from .registry import unwrap

    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    base = unwrap(model)
    decoder = base.get_decoder()
    cache_kw = cache_kwarg(decoder)
    dev = _device(model)
    pad = pad_token(tokenizer)
    p_ids = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    c_ids = [[tokenizer(str(c), add_special_tokens=False)["input_ids"] for c in cs] for cs in choices]
    limit = position_limit(model)
    if limit is not None:
        longest = max((len(c) for cs in c_ids for c in cs), default=0)
        if longest >= limit:
            raise ValueError(
                f"a choice of {longest} tokens leaves no room for its prompt in {limit} positions"
            )
        p_ids = cap_prompts(p_ids, limit - longest)
    out: list[list[float]] = [[0.0] * len(cs) for cs in choices]
    order = sorted(range(len(p_ids)), key=lambda i: len(p_ids[i]))
    was = model.training
    model.train(False)
    for s in range(0, len(order), batch_size):
        qs = order[s : s + batch_size]
        ids, mask = left_pad([p_ids[q] for q in qs], pad)
        pos = pad_positions(mask)
        pre = decoder(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True
        )
        first = torch.log_softmax(head_logits(base, pre.last_hidden_state[:, -1]).float(), -1)  # [Q, V]
        rows = [(r, q, k) for r, q in enumerate(qs) for k in range(len(c_ids[q])) if c_ids[q][k]]
        if not rows:
            continue
        cwidth = max(len(c_ids[q][k]) for _, q, k in rows)
        cids = torch.full((len(rows), cwidth), pad, dtype=torch.long)
        cmask = torch.zeros_like(cids)
        for j, (_, q, k) in enumerate(rows):
            cids[j, : len(c_ids[q][k])] = torch.tensor(c_ids[q][k])
            cmask[j, : len(c_ids[q][k])] = 1
        src = torch.tensor([r for r, _, _ in rows])
        cache = pre.cache if getattr(pre, "cache", None) is not None else pre.past_key_values
        cache.batch_select_indices(src.to(dev))  # each prompt's keys/values, once per choice
        cpos = torch.tensor([len(p_ids[q]) for _, q, _ in rows])[:, None] + torch.arange(cwidth)[None]
        hid = decoder(
            input_ids=cids.to(dev),
            attention_mask=torch.cat([mask[src], cmask], 1).to(dev),
            position_ids=cpos.to(dev),
            use_cache=True,
            **{cache_kw: cache},
        ).last_hidden_state
        lp = first[src].gather(1, cids[:, :1].to(dev))[:, 0]  # the first choice token, from the prompt's pass
        if cwidth > 1:
            nxt = cmask[:, 1:].bool()
            logits = head_logits(base, hid[:, :-1][nxt.to(dev)]).float()  # [M, V]
            tok_lp = torch.log_softmax(logits, -1).gather(1, cids[:, 1:][nxt].to(dev)[:, None])[:, 0]
            lp = lp.index_add(0, nxt.nonzero()[:, 0].to(dev), tok_lp)
        for j, (_, q, k) in enumerate(rows):
            out[q][k] = float(lp[j])
    model.train(was)
    return out


@torch.no_grad()
@uses_fused_lora
def next_token_probs(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example | str],
    token_ids: Sequence[int],
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """p(first reply token = t) for each prompt and each id in ``token_ids`` → [P, len(token_ids)]."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = cap_prompts(
        [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], position_limit(model)
    )
    pad = pad_token(tokenizer)
    out = torch.zeros(len(enc), len(token_ids))
    dev = _device(model)
    was = model.training
    model.train(False)
    for s in range(0, len(enc), batch_size):
        chunk = enc[s : s + batch_size]
        ids, mask = left_pad(chunk, pad)  # the last position is the next-token slot
        pos = pad_positions(mask)
        logits = model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), logits_to_keep=1
        ).logits[:, -1]
        probs = torch.softmax(logits.float(), -1)[:, list(token_ids)]
        out[s : s + len(chunk)] = probs.cpu()
    model.train(was)
    return out


def sequence_nll(
    model: Model, batch: dict[str, torch.Tensor], *, labelled_logits_only: bool = True, co: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed negative log-likelihood of labelled tokens and their counts.

    ``batch``: ``input_ids``/``labels``/``attention_mask`` [B, T] → (sums [B], counts [B]).
    With ``labelled_logits_only`` the LM head runs on the M labelled positions only
    ([M, H] → [M, V]) instead of all B·T, and the prompt prefix all rows share runs
    once (:mod:`bdvax_lab.core.shared_prefix`; once per adapter for co-trained ones,
    ``co``); the result is the same.
    """
    base = unwrap(model)
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE_INDEX  # [B, T-1]
    if labelled_logits_only:
        hidden = decoder_hidden(
            base.get_decoder(), batch["input_ids"], batch["attention_mask"], co
        )  # [B, T, H]
        logits = head_logits(base, hidden[:, :-1][sel])  # [M, V]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][
            sel
        ]
    ce = torch.nn.functional.cross_entropy(logits.float(), labels[sel], reduction="none")  # [M]
    rows = sel.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)
    return sums, sel.sum(1)


def reduce_nll(sums: torch.Tensor, counts: torch.Tensor, *, per_sample: bool = True) -> torch.Tensor:
    """Per-sample NLL sums and counts [B] → the training loss.

    Mean per sample then over samples, or (``per_sample=False``) per token.
    """
    if not per_sample:
        return sums.sum() / counts.sum().clamp(min=1)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def lm_loss(
    model: Model,
    batch: dict[str, torch.Tensor],
    *,
    per_sample: bool = True,
    labelled_logits_only: bool = True,
) -> torch.Tensor:
    """Training loss: mean NLL per sample then over samples (``per_sample``) or over all tokens."""
    sums, counts = sequence_nll(model, batch, labelled_logits_only=labelled_logits_only)
    return reduce_nll(sums, counts, per_sample=per_sample)
