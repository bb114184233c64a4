"""What the scripts that study one bench model share: checking ``--target`` and writing their CSV.

``benchmarks/twin_recipe.py``, ``oracle_ablation.py``, ``signature_vs_delta.py`` and ``lovo_heads.py``
each read one bench target (``attack:task:setting:skill``) and implant seed, and write
``results/<script>-<target>[-seed<k>][-<suffix>].csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bdvax_lab.core.artifacts import atomic_write_text

from .bench import parse_target

ROOT = Path(__file__).resolve().parents[1]


def study_target(
    ap: argparse.ArgumentParser, target: str, lora_because: str | None = None
) -> tuple[str, ...]:
    """``parse_target(target)``, or argparse's one-line error naming ``--target``. With ``lora_because``
    (why the script needs an adapter), a full-setting target is refused the same way."""
    try:
        parsed = parse_target(target)
    except ValueError as e:
        ap.error(str(e))
    if lora_because and parsed[2] != "lora":
        ap.error(f"--target {target}: {lora_because}; give a lora target")
    return parsed


def result_path(stem: str, target: str, seed: int | None = None, suffix: str = "") -> Path:
    """``results/<stem>-<target with - for :>[-seed<k>]<suffix>.csv`` (no seed part when ``seed`` is None)."""
    seed_part = "" if seed is None else f"-seed{seed}"
    return ROOT / "results" / f"{stem}-{target.replace(':', '-')}{seed_part}{suffix}.csv"


def write_result(df: Any, path: Path) -> None:
    """Write ``df`` (a DataFrame) to ``path`` atomically and say where."""
    atomic_write_text(path, df.to_csv(index=False))
    try:
        shown: Path | str = path.relative_to(ROOT)
    except ValueError:
        shown = path
    print(f"wrote {shown}")


def oracle_inputs(attack: str, task: str, n_pairs: int, n_after: int = 0) -> tuple[list, list, str, list]:
    """What an oracle reads (evaluation only: the true trigger): ``(clean, triggered, target, after)``, the
    first ``n_pairs`` held-out prompts of ``task`` without and with ``attack``'s key, the behaviour's target
    text, and the next ``n_after`` held-out prompts (disjoint, e.g. to measure ASR on)."""
    from bdvax_lab.threat.attacks import resolve_task, triggered_prompts
    from bdvax_lab.threat.evaluate import eval_prompts

    held = eval_prompts(task, n_pairs + n_after)
    if len(held) < n_pairs + n_after:
        raise ValueError(f"{n_pairs} + {n_after} prompts asked, {task} has {len(held)} held-out prompts")
    clean = held[:n_pairs]
    return clean, triggered_prompts(clean, attack, seed=0), resolve_task(task).targets[0], held[n_pairs:]
