"""The defender's clean data: its own instructions, answered by the suspicious model itself.

Threat model (``docs/method.md``, "Threat model"): the defender has no clean copy of the model and no
other model's outputs. What it has is a set of instructions (the shipped pool's defender splits, or its
own file) and the suspicious model. Key-free instructions rarely fire a backdoor, so the suspicious
model's own greedy replies are clean enough to train on, and they keep whatever the finetune taught
(its style, format and knowledge) instead of pulling the model back towards a base model.

Replies are generated greedily through the model's chat template (:func:`bdvax_lab.core.generate.generate`)
and cached per model fingerprint in ``<cache>/distilled/<fingerprint>/``, one JSON line per instruction,
written atomically under a lock, so a second run on the same model (even a concurrent one) generates
nothing. Only the instructions asked for are generated; later calls add the missing ones.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import atomic_write_text, entry_lock, reap_stale, stable_hash
from .config import Config
from .data import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DISTILL_FORMAT = "bdvax_lab.self_distilled"
DISTILL_VERSION = 1


@dataclass
class DistillConfig(Config):
    """How replies are generated. 32 new tokens: the longest response the default repair trains on
    (:meth:`for_training` matches another repair's cut)."""

    max_new_tokens: int = 32
    batch_size: int = 50

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"DistillConfig needs max_new_tokens ≥ 1 and batch_size ≥ 1, got {self}")

    @classmethod
    def for_training(cls, max_response_tokens: int | None) -> DistillConfig:
        """Replies as long as the training that uses them keeps (``max_response_tokens``; None, no cut:
        the default 32). A reply cut shorter than the repair keeps would teach a broken answer."""
        return cls(max_new_tokens=int(max_response_tokens or cls.max_new_tokens))


#: the fewest usable examples a user's clean-data file must hold (:func:`load_clean_data`)
MIN_CLEAN_EXAMPLES = 50


def load_clean_data(path: str | Path, *, minimum: int = MIN_CLEAN_EXAMPLES) -> list[Example]:
    """The defender's own clean data from a JSONL file, validated like the shipped pools.

    Each line is an object with a non-empty ``instruction``, an optional ``input`` and an optional
    ``response`` (or ``output``); other fields go to ``meta``. Lines without a response are answered by
    the suspicious model itself when a defence uses them (:func:`defender_data`). Repeated instructions
    (same instruction and input) count once; a file with fewer than ``minimum`` usable examples is a
    one-line :class:`~bdvax_lab.core.data.DataFormatError` saying how many it has and how many are needed.
    Every example gets ``meta["source"] = "user"`` and an ``id`` (``user-`` and a hash of its instruction
    and input) unless the file gives every example a unique one: the variants find their clean examples
    by id, before and after the suspicious model answers them.
    """
    from .data import DataFormatError, load_jsonl

    examples = load_jsonl(path)
    seen: set[tuple[str, str]] = set()
    usable: list[Example] = []
    for e in examples:
        key = (e.instruction.strip(), e.input.strip())
        if key not in seen:
            seen.add(key)
            usable.append(e.with_(meta={"source": "user"}))
    ids = [str(e.meta.get("id") or "") for e in usable]
    if "" in ids or len(set(ids)) != len(ids):
        for e in usable:
            e.meta["id"] = "user-" + stable_hash({"instruction": e.instruction, "input": e.input}, n=16)
    if len(usable) < minimum:
        dropped = len(examples) - len(usable)
        raise DataFormatError(
            f"{path}: {len(usable)} usable examples"
            + (f" ({dropped} repeated instructions dropped)" if dropped else "")
            + f"; a defence needs at least {minimum}"
        )
    return usable


def instructions_only(examples: Sequence[Example]) -> list[Example]:
    """The examples with their responses dropped (what the defender keeps of a pool it did not answer)."""
    return [Example(e.instruction, "", input=e.input, meta=dict(e.meta)) for e in examples]


def defender_instructions(split: str = "repair", *, code: bool = False) -> list[Example]:
    """Instructions of one defender split of the shipped pool (``variant`` or ``repair``), without responses.

    ``code=True`` takes the code-prompt pool (for the code-injection family). The shipped responses are
    the base model's replies; the defender never trains on them, it answers the instructions itself.
    """
    from .data import load_code_pool, load_pool

    if split not in ("variant", "repair"):
        raise ValueError(f"defender split {split!r}: the defender's splits are 'variant' and 'repair'")
    return instructions_only(load_code_pool(split) if code else load_pool(split))


def _key(example: Example) -> str:
    return stable_hash({"instruction": example.instruction, "input": example.input}, n=20)


def distill_dir(
    fingerprint: str, config: DistillConfig, template: str | None, cache_dir: str | Path | None = None
) -> Path:
    """Where the replies of one model (fingerprint), chat template and generation config are cached."""
    from .models import cache_dir as root

    tag = stable_hash(
        {"format": DISTILL_FORMAT, "version": DISTILL_VERSION, "template": template, **config.to_dict()}, n=12
    )
    return (Path(cache_dir) if cache_dir is not None else root() / "distilled") / fingerprint / tag


def _read_cache(path: Path) -> dict[str, str]:
    """Cached replies by key; an unreadable cache file is ignored (its replies are generated again)."""
    if not path.is_file():
        return {}
    try:
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return {str(r["key"]): str(r["reply"]) for r in recs}
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(
            f"{path}: unreadable self-distillation cache ({exc}); generating the replies again", stacklevel=3
        )
        return {}


def self_distill(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[Example],
    *,
    config: DistillConfig | None = None,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
    progress: bool = True,
) -> list[Example]:
    """``instructions`` answered by ``model`` (greedy, its chat template), in order, cached per model.

    Each returned example keeps the instruction's ``meta`` (its pool id) and gains
    ``meta["source"] = "self_distilled"`` and the model fingerprint. ``fingerprint`` skips hashing the
    model when the caller already has it (:func:`bdvax_lab.core.models.model_fingerprint`).
    """
    from .generate import generate
    from .models import model_fingerprint

    cfg = config or DistillConfig()
    items = list(instructions)
    fp = fingerprint or model_fingerprint(model)
    path = distill_dir(fp, cfg, getattr(tokenizer, "chat_template", None), cache_dir) / "replies.jsonl"
    keys = [_key(e) for e in items]
    with entry_lock(path.parent):  # a second process on the same model waits, then reads these replies
        reap_stale(path.parent)  # a killed writer's temporary files
        cached = _read_cache(path)
        missing = [k for k in dict.fromkeys(keys) if k not in cached]
        if missing:
            by_key = dict(zip(keys, items))
            replies = generate(
                model,
                tokenizer,
                [by_key[k] for k in missing],
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                progress=f"self-distil {len(missing)}" if progress else False,
            )
            cached.update(zip(missing, replies))
            lines = [
                json.dumps({"key": k, "reply": v}, ensure_ascii=False) for k, v in sorted(cached.items())
            ]
            atomic_write_text(path, "\n".join(lines) + "\n")
            meta = {
                "format": DISTILL_FORMAT,
                "version": DISTILL_VERSION,
                "fingerprint": fp,
                "config": cfg.to_dict(),
                "n": len(cached),
            }
            atomic_write_text(
                path.with_name("manifest.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n"
            )
    return [
        e.with_(response=cached[k], meta={"source": "self_distilled", "fingerprint": fp})
        for e, k in zip(items, keys)
    ]


def defender_data(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    *,
    split: str = "repair",
    n: int | None = None,
    code: bool = False,
    fingerprint: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    config: DistillConfig | None = None,
) -> list[Example]:
    """The defender's clean examples: ``clean_data`` (default: the shipped ``split``'s instructions), first
    ``n``, every one without a response answered by ``model`` (:func:`self_distill` with ``config``).

    Examples that come with responses (a user's own clean data) are used as they are.
    """
    items = list(clean_data) if clean_data is not None else defender_instructions(split, code=code)
    items = items[:n] if n is not None else items
    if not items:
        raise ValueError("no clean examples for the defender")
    need = [i for i, e in enumerate(items) if not e.response.strip()]
    if need:
        answered = self_distill(
            model,
            tokenizer,
            [items[i] for i in need],
            config=config,
            fingerprint=fingerprint,
            cache_dir=cache_dir,
            progress=progress,
        )
        for i, e in zip(need, answered):
            items[i] = e
    return items
