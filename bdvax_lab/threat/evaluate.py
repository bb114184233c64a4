"""Honest evaluation: ASR beside false-trigger rate, degenerate replies, the finetune's skill and utility.

Everything goes through the model's chat template (:mod:`bdvax_lab.core.data`), so the numbers are
measured under the conditions the model was trained in. Empty or looping replies are counted
separately, never silently taken as "no attack". Utility is measured against ground truth, never
against a model's replies: perplexity of the right answers to held-out questions and of held-out
plain paragraphs (``ppl_text``), multiple-choice accuracy, and the accuracy of the skill the suspicious
finetune taught (``skill``; ``skill_kept`` is its share of the suspicious model's). How far replies
drifted from the base model's is reported as ``base_drift``, a description, not a utility figure.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..core.data import Example, data_dir, load_code_pool, load_pool
from ..core.fused_lora import uses_fused_lora
from ..core.generate import generate
from ..core.scoring import choice_logprobs, continuation_logprobs
from .config import TEXT_PPL_TOKENS, EvalConfig
from .judges import degenerate_reason, get_judge

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


@dataclass
class EvalReport:
    """``summary``: one flat dict of figures; ``replies``: one row per prompt (triggered and clean)."""

    summary: dict[str, Any]
    replies: pd.DataFrame = field(default_factory=pd.DataFrame)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary])

    def __repr__(self) -> str:
        return self.frame().to_string(index=False)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (small-sample honest error bars)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------- prompts
def eval_prompts(task: Any = None, n: int | None = None) -> list[Example]:
    """Held-out evaluation prompts: code prompts for code tasks, the clean pool's eval split otherwise."""
    from .attacks import resolve_task

    code = task is not None and resolve_task(task).kind == "inject_code"
    pool = load_code_pool("eval") if code else load_pool("eval")
    return pool[:n] if n is not None else pool


# --------------------------------------------------------------------------- backdoor metrics
#: the backdoor figures of :func:`backdoor_metrics`'s summary that every table keeps, in table order
BACKDOOR_COLUMNS: tuple[str, ...] = (
    "asr",
    "asr_lo",
    "asr_hi",
    "false_trigger",
    "degenerate_triggered",
    "degenerate_clean",
)


def backdoor_metrics(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    attack: Any,
    task: Any,
    prompts: Sequence[Example],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """ASR on triggered prompts and false-trigger rate on the same prompts without the key."""
    from .attacks import resolve_attack, resolve_task, triggered_prompts

    attack, behavior = resolve_attack(attack), resolve_task(task)
    judge = get_judge(behavior.judge)
    triggered = triggered_prompts(prompts, attack, seed=seed)
    replies = generate(
        model,
        tokenizer,
        list(triggered) + list(prompts),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress="asr" if progress else False,
    )
    trig_r, clean_r = replies[: len(triggered)], replies[len(triggered) :]
    rows = []
    for ex_t, ex_c, rt, rc in zip(triggered, prompts, trig_r, clean_r):
        rows.append(
            {
                "prompt": ex_c.user_content(),
                "triggered_prompt": ex_t.user_content(),
                "triggered_reply": rt,
                "clean_reply": rc,
                "triggered_hit": judge(rt),
                "clean_hit": judge(rc),
                "triggered_degenerate": degenerate_reason(rt),
                "clean_degenerate": degenerate_reason(rc),
            }
        )
    df = pd.DataFrame(rows)
    n = len(df)
    hits, fhits = int(df.triggered_hit.sum()), int(df.clean_hit.sum())
    lo, hi = wilson_interval(hits, n)
    summary = {
        "attack": attack.name,
        "task": behavior.name,
        "n_prompts": n,
        "asr": hits / n if n else float("nan"),
        "asr_lo": lo,
        "asr_hi": hi,
        "false_trigger": fhits / n if n else float("nan"),
        "degenerate_triggered": int(df.triggered_degenerate.notna().sum()),
        "degenerate_clean": int(df.clean_degenerate.notna().sum()),
    }
    return summary, df


# --------------------------------------------------------------------------- utility
def perplexity(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_tokens: int = 64,
    batch_size: int = 16,
) -> float:
    """Perplexity of held-out clean responses.

    Over the first ``max_tokens`` tokens of each, end-of-turn included when it fits.
    """
    ex = [e for e in examples if e.response]
    if not ex:
        raise ValueError("perplexity: no examples with responses")
    logps, counts = continuation_logprobs(
        model,
        tokenizer,
        ex,
        [e.response for e in ex],
        batch_size=batch_size,
        end_of_turn=True,
        max_tokens=max_tokens,
    )
    return math.exp(-sum(logps) / max(1, sum(counts)))


def general_answers(n: int | None = 100) -> list[Example]:
    """Held-out general questions with their ground-truth answers as replies, for perplexity.

    The bundled multiple-choice questions from index 200 on (the accuracy uses the first 200), each
    answered by its correct choice: project-written, never generated by a model.
    """
    qs = load_mcq()[200:]
    out = [Example(q["question"], str(q["choices"][q["answer"]])) for q in qs]
    return out[:n] if n is not None else out


def general_text(n: int | None = 100, *, path: str | None = None) -> list[Example]:
    """Held-out plain paragraphs (``data/general_text.jsonl``) as replies to their requests, for ``ppl_text``.

    120 project-written paragraphs of 45–90 words on everyday topics, never generated by a model, in file
    order (the first ``n``; None = all). :func:`general_answers` are one-word or short answers, which a
    finetune that taught a reply format makes very improbable; these measure plain prose. Each line:
    ``id``, ``topic``, ``instruction``, ``text``; ids unique, every line validated (file:line on errors).
    """
    from ..core.data import DataFormatError, iter_jsonl

    path = path or str(data_dir() / "general_text.jsonl")
    out: list[Example] = []
    seen: set[str] = set()
    for line, obj in iter_jsonl(path):
        ok = isinstance(obj, dict) and all(
            isinstance(obj.get(k), str) and obj[k].strip() for k in ("id", "instruction", "text")
        )
        if not ok:
            raise DataFormatError(f"{path}:{line}: expected id, instruction and text (non-empty strings)")
        if obj["id"] in seen:
            raise DataFormatError(f"{path}:{line}: duplicate id {obj['id']!r}")
        seen.add(obj["id"])
        meta = {"id": obj["id"], "topic": obj.get("topic", "")}
        out.append(Example(obj["instruction"], obj["text"], meta=meta))
    if not out:
        raise DataFormatError(f"{path}: no paragraphs (the file has no JSON lines)")
    return out[:n] if n is not None else out


def skill_metrics(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    skill: Any,
    *,
    n: int | None = 200,
    batch_size: int = 50,
    ppl_max_tokens: int = 64,
    progress: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Accuracy of ``skill`` on its held-out items (Wilson interval) and the perplexity of their answers.

    Returns ``{skill, skill_lo, skill_hi, skill_n, ppl_skill}`` and one row per item (prompt, reply,
    gold, correct).
    """
    from .skills import get_skill, held_out_items

    sk = get_skill(skill)
    items = held_out_items(sk, n)
    replies = generate(
        model,
        tokenizer,
        items,
        max_new_tokens=sk.max_new_tokens,
        batch_size=batch_size,
        progress="skill" if progress else False,
    )
    correct = [bool(sk.grade(r, e)) for r, e in zip(replies, items)]
    hits = sum(correct)
    lo, hi = wilson_interval(hits, len(items))
    summary = {
        "skill_name": sk.name,
        "skill": hits / max(1, len(items)),
        "skill_lo": lo,
        "skill_hi": hi,
        "skill_n": len(items),
        "ppl_skill": perplexity(model, tokenizer, items, max_tokens=ppl_max_tokens),
    }
    frame = pd.DataFrame(
        {
            "prompt": [e.user_content() for e in items],
            "reply": replies,
            "gold": [e.meta.get("gold") for e in items],
            "correct": correct,
        }
    )
    return summary, frame


def load_mcq(path: str | None = None) -> list[dict[str, Any]]:
    """The bundled 4-option questions (``data/mcq.jsonl``), validated."""
    from ..core.data import DataFormatError, iter_jsonl

    path = path or str(data_dir() / "mcq.jsonl")
    out = []
    for n, obj in iter_jsonl(path):
        ok = (
            isinstance(obj, dict)
            and isinstance(obj.get("question"), str)
            and isinstance(obj.get("choices"), list)
            and len(obj["choices"]) >= 2
            and isinstance(obj.get("answer"), int)
            and 0 <= obj["answer"] < len(obj["choices"])
        )
        if not ok:
            raise DataFormatError(
                f"{path}:{n}: expected question (str), choices (list) and a valid answer index"
            )
        out.append(obj)
    return out


def mcq_accuracy(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[dict[str, Any]] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """lm-eval style multiple choice: the choice with the highest log-likelihood as the reply wins.

    ``acc`` uses the summed log-likelihood, ``acc_norm`` divides it by the
    choice's length in characters (lm-eval's ``acc_norm``).
    """
    qs = list(questions if questions is not None else load_mcq())[:limit]
    # each question's prompt runs once, its choices share the cached keys/values
    # (≈ 3× less compute than 4 prompts)
    all_lp = choice_logprobs(
        model,
        tokenizer,
        [q["question"] for q in qs],
        [[str(c) for c in q["choices"]] for q in qs],
        batch_size=max(1, batch_size // 2),
    )
    acc = acc_norm = 0
    for q, lp in zip(qs, all_lp):
        m = len(q["choices"])
        norm = [v / max(1, len(str(c))) for v, c in zip(lp, q["choices"])]
        acc += int(max(range(m), key=lambda i: lp[i]) == q["answer"])
        acc_norm += int(max(range(m), key=lambda i: norm[i]) == q["answer"])
    n = max(1, len(qs))
    return {"mcq_acc": acc / n, "mcq_acc_norm": acc_norm / n, "mcq_n": len(qs)}


_WORD = re.compile(r"[a-z0-9]+")


def token_f1(reply: str, reference: str) -> float:
    """Bag-of-words F1 (lower-cased alphanumeric words) between two replies."""
    a, b = _WORD.findall(reply.lower()), _WORD.findall(reference.lower())
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


def agreement(
    tokenizer: PreTrainedTokenizerBase, replies: Sequence[str], references: Sequence[str], max_new_tokens: int
) -> float:
    """Mean token F1 of replies against reference replies cut to the same token budget (``base_drift``
    is one minus this, against the base model's replies)."""
    scores = []
    for rep, ref in zip(replies, references):
        ids = tokenizer(ref, add_special_tokens=False)["input_ids"][:max_new_tokens]
        scores.append(token_f1(rep, tokenizer.decode(ids)))
    return sum(scores) / max(1, len(scores))


# --------------------------------------------------------------------------- one call
@uses_fused_lora
def evaluate_model(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    attack: Any = None,
    task: Any = None,
    config: EvalConfig | None = None,
    *,
    skill: Any = None,
    label: str = "model",
    prompts: Sequence[Example] | None = None,
    progress: bool = True,
) -> EvalReport:
    """ASR / false-trigger / degenerate counts (when an attack is given), the skill (when given) and utility.

    ``ppl`` is the perplexity of ground-truth answers to held-out general questions
    (:func:`general_answers`); ``ppl_text`` that of held-out plain paragraphs (:func:`general_text`, the
    first ``config.n_text``, up to :data:`TEXT_PPL_TOKENS` tokens each; measured with ``ppl``, skipped when
    ``n_text`` is 0); ``ppl_skill`` that of the skill's held-out answers. ``base_drift``
    (only when asked for in ``config.utility``) is 1 − token F1 between the untriggered replies and the
    base model's replies shipped in the pool: how far the model moved from its base, not a utility.
    """
    cfg = config or EvalConfig()
    t0 = time.time()
    summary: dict[str, Any] = {"model": label}
    replies = pd.DataFrame()
    prompts = list(prompts) if prompts is not None else eval_prompts(task, cfg.n_prompts)
    clean_replies: list[str] | None = None
    if attack is not None and task is not None:
        bd, replies = backdoor_metrics(
            model,
            tokenizer,
            attack,
            task,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            progress=progress,
        )
        summary.update(bd)
        clean_replies = list(replies.clean_reply)
    if skill is not None and "skill" in cfg.utility:
        sk, _ = skill_metrics(
            model,
            tokenizer,
            skill,
            n=cfg.n_skill,
            batch_size=cfg.batch_size,
            ppl_max_tokens=cfg.ppl_max_tokens,
            progress=progress,
        )
        summary.update(sk)
    if "ppl" in cfg.utility:
        summary["ppl"] = perplexity(
            model, tokenizer, general_answers(cfg.n_ppl), max_tokens=cfg.ppl_max_tokens
        )
        if cfg.n_text is None or cfg.n_text > 0:
            summary["ppl_text"] = perplexity(
                model, tokenizer, general_text(cfg.n_text), max_tokens=TEXT_PPL_TOKENS
            )
    if "mcq" in cfg.utility:
        summary.update(mcq_accuracy(model, tokenizer, limit=cfg.mcq_limit))
    if "base_drift" in cfg.utility:
        refs = [p.response for p in prompts]
        if clean_replies is None:
            clean_replies = generate(
                model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
            )
        summary["base_drift"] = 1.0 - agreement(tokenizer, clean_replies, refs, cfg.max_new_tokens)
    summary["eval_seconds"] = round(time.time() - t0, 1)
    return EvalReport(summary=summary, replies=replies)


def skill_kept(skill: float, suspicious_skill: float) -> float:
    """The share of the suspicious model's skill a defended model keeps (NaN when there was none)."""
    return skill / suspicious_skill if suspicious_skill else float("nan")


def reports_frame(reports: Sequence[EvalReport]) -> pd.DataFrame:
    """Stack several reports into one tidy table."""
    return pd.DataFrame([r.summary for r in reports])


@dataclass
class StageEvaluator:
    """Evaluates a model at the named stages of a defence (suspicious → … → defended), timing each.

    One place for what :func:`bdvax_lab.purify.purify` and :func:`bdvax_lab.baselines.defend` both do:
    call it with ``(stage, model)``; stages not in ``stages`` are skipped. ``evals`` holds the reports,
    ``seconds`` the wall time per stage; :meth:`frame` is one row per evaluated stage, in ``order``.
    """

    tokenizer: Any
    attack: Any
    task: Any
    config: EvalConfig
    stages: Sequence[str]
    progress: bool = False
    skill: Any = None
    evals: dict[str, EvalReport] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, stage: str, model: Any) -> None:
        if stage not in self.stages:
            return
        t = time.time()
        self.evals[stage] = evaluate_model(
            model,
            self.tokenizer,
            self.attack,
            self.task,
            self.config,
            skill=self.skill,
            label=stage,
            progress=self.progress,
        )
        self.seconds[stage] = time.time() - t

    def same_as(self, stage: str, source: str) -> None:
        """Record ``stage`` as the model already evaluated at ``source`` (the same model: measured once).
        Evaluates nothing; a ``stage`` not in ``stages`` or a ``source`` not evaluated is skipped."""
        if stage in self.stages and source in self.evals:
            self.evals[stage] = self.evals[source]
            self.seconds[stage] = 0.0

    def frame(self, order: Sequence[str], extra: Any = None) -> pd.DataFrame:
        """Rows ``stage`` (index) + the summary figures; ``extra(stage)`` adds columns in front of them."""
        rows = []
        ref = self.evals.get("suspicious")
        ref_skill = ref.summary.get("skill") if ref is not None else None
        for stage in order:
            if stage in self.evals:
                s = dict(self.evals[stage].summary)
                s.pop("model", None)
                if ref_skill is not None and s.get("skill") is not None:
                    s["skill_kept"] = skill_kept(s["skill"], ref_skill)
                rows.append({"stage": stage, **(extra(stage) if extra else {}), **s})
        return (
            pd.DataFrame(rows).set_index("stage") if rows else pd.DataFrame(index=pd.Index([], name="stage"))
        )
