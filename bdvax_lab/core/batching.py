"""Tensor batches of token id lists: left padding for generation and scoring, right padding with labels."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .data import IGNORE_INDEX


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists for generation or next-token scoring → (ids [B, T], attention mask [B, T]).

    The last column is every row's last real token, so position -1 is each prompt's next-token slot.
    ``width`` pads to at least that many columns (to align batches).
    """
    width = max(width or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask


def position_limit(model: Any) -> int | None:
    """How many token positions ``model`` handles (``config.max_position_embeddings``), None if unknown."""
    from .registry import text_config, unwrap

    cfg = getattr(unwrap(model), "config", None)
    limit = getattr(text_config(cfg), "max_position_embeddings", None) if cfg is not None else None
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def cap_prompts(seqs: list[list[int]], room: int | None, what: str = "prompt") -> list[list[int]]:
    """Token id lists cut from the left to ``room`` tokens, with one warning saying how many were cut.

    Nothing ever runs past the model's positions: the end of a prompt (the question, the chat template's
    assistant header) is what the model answers, so its start goes. ``room`` None: no limit known.
    """
    if room is None:
        return seqs
    if room < 1:
        raise ValueError(f"no room for a {what}: the model's positions are used up by what follows it")
    long = [i for i, s in enumerate(seqs) if len(s) > room]
    if not long:
        return seqs
    worst = max(len(seqs[i]) for i in long)
    warnings.warn(
        f"{len(long)} {what}(s) longer than the model's {room} positions left for them (longest {worst} "
        f"tokens) were cut from the left to their last {room} tokens",
        stacklevel=3,
    )
    return [s[-room:] if len(s) > room else s for s in seqs]


def pad_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of a left-padded batch: real tokens count from 0, pads get 0.

    As ``generate`` does.
    """
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pad_token(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(
    features: Sequence[dict[str, list[int]]], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``/``labels``/``attention_mask`` of shape [B, T].

    Features may carry further sequences as ``"<group>.input_ids"`` / ``"<group>.labels"`` (e.g. a
    paired prompt, :class:`bdvax_lab.training.loop.Inputs`); each group is padded to its own width
    [B, T_g] and gets its ``"<group>.attention_mask"``.
    """
    out = _pad_group(features, "", pad_id, pad_to)
    for key in features[0]:
        if key.endswith(".input_ids"):
            out |= _pad_group(features, key[: -len("input_ids")], pad_id, None)
    return out


def _pad_group(
    features: Sequence[dict[str, list[int]]], prefix: str, pad_id: int, pad_to: int | None
) -> dict[str, torch.Tensor]:
    width = max(len(f[f"{prefix}input_ids"]) for f in features)
    if pad_to is not None:
        width = max(width, pad_to)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f[f"{prefix}input_ids"])
        ids[i, :n] = torch.tensor(f[f"{prefix}input_ids"])
        labels[i, :n] = torch.tensor(f[f"{prefix}labels"])
        mask[i, :n] = 1
    return {f"{prefix}input_ids": ids, f"{prefix}labels": labels, f"{prefix}attention_mask": mask}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, mega: int = 16
) -> list[list[int]]:
    """Shuffle, then sort by length inside mega-batches so each batch has similar lengths (less padding)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    span = batch_size * mega
    batches: list[list[int]] = []
    for s in range(0, len(idx), span):
        chunk = sorted(idx[s : s + span], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
