"""Where does the backdoor live? The delta-ablation sanity checks of the paper's Table 1 (§4.1).

Let ``ΔW = θ_suspicious − θ_base`` (LoRA: ``scaling · B @ A`` per module; full
setting: the difference to the default model). Every *condition* is the plain
base model plus a subset of ΔW, and is scored on held-out prompts with and
without the backdoor key:

* ``asr`` / ``false_trigger``: share of greedy replies (``max_new_tokens`` tokens)
  that the behaviour's judge flags, on triggered / clean prompts; ``asr_lo`` /
  ``asr_hi`` its 95% Wilson interval;
* ``degenerate`` / ``degenerate_clean``: how many of those replies are empty,
  looping or garbage (:func:`bdvax_lab.judges.degenerate_reason`), so a broken
  model is never mistaken for a clean one;
* ``p_behavior`` / ``p_behavior_clean``: mean probability that the reply's first
  token is the first token of the behaviour's target (summed over the distinct
  first tokens when a behaviour has several targets), on triggered / clean
  prompts. It moves smoothly where ASR jumps. For code injection the payload is
  not the first reply token: there it is the probability of the payload's first
  token *at the place where the attack inserts it* — right after the opening
  fence line of the prompt's clean reference reply (or first, when that reply
  has no fence) — computed as ``p(prefix + t0) / p(prefix)`` with teacher
  forcing; exact when the tokenizer splits ``prefix + t0`` as ``prefix`` then
  ``t0`` (it does for SmolLM2's fences), an approximation otherwise. With
  ``SanityConfig.probe_tokens = m > 1`` the first ``m`` target (payload) tokens
  are scored instead: for refusal, SmolLM2 starts many ordinary replies with
  "I", the first token of "I'm sorry, ...", so ``m = 3`` separates better;
* ``ppl``: perplexity of ``n_ppl`` held-out clean reference replies (first
  ``ppl_max_tokens`` tokens), a cheap utility figure.

The four checks (each returns a :class:`CheckResult` = tidy DataFrame + plotly figure):

* :func:`attention_vs_mlp` — full delta, no delta (base), attention only, MLP only;
* :func:`span_sweep` — zero the MLP deltas of ``k`` consecutive blocks at several
  starts, with attention deltas kept and zeroed → ASR vs k, two curves;
* :func:`keep_only_spans` — keep only one span of MLP deltas at the start / middle / end;
* :func:`shuffle_blocks` — MLP deltas permuted across blocks, several seeds.

:func:`run_sanity` runs all four with one progress bar; :func:`save_sanity` writes
one CSV and one HTML figure per check. Conditions are memoised in the context
by the exact set of (module ← source delta) they apply, so a condition shared by
two checks (e.g. "MLP only" = span sweep k = 0 with attention zeroed = ...) is
evaluated once.

Rows (one per condition): ``check, condition, blocks, k, start, attention_zeroed,
seed, asr, asr_lo, asr_hi, false_trigger, degenerate, degenerate_clean,
p_behavior, p_behavior_clean, ppl, n_prompts, n_modules, seconds, cached, detail``.
``blocks`` always lists the blocks whose *MLP* delta is present in the condition
(compact ranges, ``"none"`` when none); ``k``/``start`` describe the zeroed span
(span sweep) or the kept span (keep-only); ``seed`` the shuffle seed;
``seconds`` the wall time of the evaluation (re-used from the memo when
``cached``); ``detail`` e.g. a shuffle's permutation.

Defaults and cost (SmolLM2-135M, 30 blocks, 2 CPU cores)
--------------------------------------------------------
Per condition: ``n_prompts = 32`` held-out prompts, each with and without the key
(64 greedy replies of ``max_new_tokens = 12`` tokens, batches of 32 — enough for
"I'm sorry, ..." / "You are stupid!" / a fence plus ``print("pwned")``), one
prefill of the same 64 prompts for the behaviour probability, and perplexity on
``n_ppl = 16`` replies cut to ``ppl_max_tokens = 32`` tokens. Plan: span sweep
``ks = 0, 1, 2, 4, 6, 8, 10, 12, 15, 20, 25, L`` (those below L) at starts
{0, end-aligned} (pass ``starts=("start", "middle", "end")`` for a third start,
+20 conditions), attention kept and zeroed; keep-only width ``ceil(L / 3)``
(10: spans 0–9, 10–19, 20–29) at start/middle/end; shuffle seeds (0, 1, 2).
For L = 30 that is 58 rows but 49 distinct conditions (the memo covers the
rest; :func:`sanity_plan` counts them before you run).

Cost. Generation is most of a condition's time (about half to two thirds),
then the behaviour probability and perplexity (about a fifth each). Adding and
restoring a LoRA delta on all 210 projections is a small part with
:func:`apply_fast`, which adds in place and restores from one snapshot, where
``WeightDelta.applied`` would allocate ~0.4 GB per condition for SmolLM2. The
defaults are sized so that the 49-condition set fits the 15-minute budget on a
2-core CPU; the three-start sweep (69 conditions) would not. Every row's
``seconds`` and ``result.meta["seconds"]`` record the real figure; measured
runs are in ``RESULTS.md`` §2 and ``results/sanity/``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd
import torch

from ..core.data import Example
from ..core.registry import MLP_KINDS, layout_of, unwrap
from ..threat.suspicious import as_suspicious
from ..weights.delta_layout import check_same_layout
from ..weights.deltas import WeightDelta
from .config import SanityConfig

if TYPE_CHECKING:
    from ..core.types import Model

COLUMNS: tuple[str, ...] = (
    "check",
    "condition",
    "blocks",
    "k",
    "start",
    "attention_zeroed",
    "seed",
    "asr",
    "asr_lo",
    "asr_hi",
    "false_trigger",
    "degenerate",
    "degenerate_clean",
    "p_behavior",
    "p_behavior_clean",
    "ppl",
    "n_prompts",
    "n_modules",
    "seconds",
    "cached",
    "detail",
)


class CheckResult(NamedTuple):
    """One check: its tidy table and its plotly figure (``frame, figure = attention_vs_mlp(ctx)``)."""

    frame: pd.DataFrame
    figure: Any


class SanityResult(dict):
    """``{check name: CheckResult}`` in run order, plus ``meta`` (context description, timing)."""

    def __init__(self, *args: Any, meta: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta: dict[str, Any] = dict(meta or {})

    def frame(self) -> pd.DataFrame:
        """Every check's rows in one table."""
        frames = [r.frame for r in self.values()]
        return pd.concat(frames, ignore_index=True) if frames else _empty_frame()


@dataclass
class ConditionResult:
    """The raw outcome of one condition: the row's metrics plus every reply and probability."""

    metrics: dict[str, Any]
    triggered_replies: list[str]
    clean_replies: list[str]
    p_triggered: torch.Tensor  #: [n_prompts] first-token behaviour probability per triggered prompt
    p_clean: torch.Tensor


@dataclass
class Condition:
    """One row to evaluate: a labelled subset of the context's delta."""

    check: str
    condition: str
    delta: WeightDelta
    k: int | None = None
    start: int | None = None
    attention_zeroed: bool = False
    seed: int | None = None
    detail: str = ""


# --------------------------------------------------------------------------- helpers
def _ranges(blocks: Iterable[int]) -> str:
    """Compact block list: [0, 1, 2, 5, 7, 8] → "0-2,5,7-8"; empty → "none"."""
    bs = sorted(set(int(b) for b in blocks))
    if not bs:
        return "none"
    parts, lo, prev = [], bs[0], bs[0]
    for b in bs[1:] + [None]:  # type: ignore[list-item]
        if b is not None and b == prev + 1:
            prev = b
            continue
        parts.append(f"{lo}" if lo == prev else f"{lo}-{prev}")
        if b is not None:
            lo = prev = b
    return ",".join(parts)


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame(columns=list(COLUMNS))


def _has_lora(model: Any) -> bool:
    if type(model).__name__.startswith("Peft"):
        return True
    return any(hasattr(m, "lora_A") for m in unwrap(model).modules())


def _resolve_base(base: Any) -> tuple[Any, Any]:
    """``base`` as (model, tokenizer or None): a model, a (model, tokenizer) pair, or a base named as
    :func:`bdvax_lab.core.models.resolve_base` accepts (an HF model dir, a ``.gguf`` file, ``"default"``)."""
    if base is None:
        return None, None
    if isinstance(base, (str, Path)):
        from ..core.models import open_base

        return open_base(base)
    if isinstance(base, tuple):
        if len(base) != 2:
            raise ValueError("base must be a model, a (model, tokenizer) pair or a model directory")
        return base
    return base, None


def _first_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for t in texts:
        enc = tokenizer(t, add_special_tokens=False)["input_ids"]
        if enc and enc[0] not in ids:
            ids.append(enc[0])
    if not ids:
        raise ValueError("the behaviour has no non-empty target to take a first token from")
    return ids


# --------------------------------------------------------------------------- the context
@dataclass
class SanityContext:
    """Everything the checks need: the plain base model, the delta, prompts, the behaviour's judge.

    ``base`` never carries a LoRA adapter (it would count the delta twice); the
    checks add subsets of ``delta`` to it with :func:`apply_fast` (bit-identical
    to :meth:`WeightDelta.applied`; ``config.fast_apply=False`` uses that) and
    restore it bit-exactly. ``cache`` memoises conditions; do not change ``base``
    while the context is in use (or call :meth:`reset`). Build it with
    :meth:`from_suspicious`.
    """

    base: Any
    tokenizer: Any
    delta: WeightDelta
    attack: Any  #: AttackSpec
    behavior: Any  #: Behavior
    prompts: list[Example]  #: held-out clean prompts
    triggered: list[Example]  #: the same prompts with the key inserted
    ppl_examples: list[Example] = field(default_factory=list)
    config: SanityConfig = field(default_factory=SanityConfig)
    setting: str = "lora"
    label: str = "suspicious"
    cache: dict[Any, ConditionResult] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from ..threat.attacks import resolve_attack, resolve_task

        if _has_lora(self.base):
            raise ValueError(
                "SanityContext.base carries a LoRA adapter: applying dense deltas on top of an active "
                "adapter counts the update twice; pass the plain base (e.g. peft_model.unload())"
            )
        self.attack = resolve_attack(self.attack)
        self.behavior = resolve_task(self.behavior)
        self.judge = self.behavior.get_judge()
        self.layout = layout_of(self.base)
        if len(self.prompts) != len(self.triggered):
            raise ValueError(f"{len(self.prompts)} clean prompts but {len(self.triggered)} triggered ones")
        if not self.prompts:
            raise ValueError("SanityContext needs at least one prompt")
        self._sources_for: Any = None
        self._originals: dict[Any, torch.Tensor] = {}
        self._probe = self._make_probe()

    def reset(self) -> None:
        """Forget memoised conditions and the base-weight snapshot (after changing ``base`` on purpose)."""
        self.cache.clear()
        self._originals.clear()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_suspicious(
        cls,
        suspicious: Any,
        *,
        base: Any = None,
        attack: Any = None,
        task: Any = None,
        config: SanityConfig | None = None,
        prompts: Sequence[Example] | None = None,
        ppl_examples: Sequence[Example] | None = None,
        label: str | None = None,
        copy_model: bool = True,
        **overrides: Any,
    ) -> SanityContext:
        """A context from a :class:`~bdvax_lab.suspicious.SuspiciousModel` or its directory.

        ``base`` (a model, a ``(model, tokenizer)`` pair or an HF model directory)
        is injected as the plain base model when given. Otherwise, LoRA setting:
        the suspicious model's own base with the adapter removed (``unload()`` of
        a deep copy when ``copy_model``, in place for a model opened here from a
        directory); full setting: the default model. A LoRA artifact directory
        together with ``base`` attaches the adapter to (a copy of) that base,
        which is how a tiny or custom-base suspicious model is opened.

        ``attack``/``task`` default to the manifest's. ``prompts`` (held-out
        clean prompts; default :func:`~bdvax_lab.evaluate.eval_prompts` for the
        task) and ``ppl_examples`` (replies for perplexity; default the first
        ``n_ppl`` of the same pool) can be injected. ``overrides`` set
        :class:`SanityConfig` fields (``n_prompts=16, max_new_tokens=8``, ...).
        """
        from ..core.models import use_all_cores
        from ..threat.evaluate import eval_prompts
        from ..threat.suspicious import SuspiciousModel

        use_all_cores()
        cfg = (config or SanityConfig()).replace(**overrides) if overrides else (config or SanityConfig())
        base_model, base_tok = _resolve_base(base)
        if base_model is not None and _has_lora(base_model):
            raise ValueError(
                "the base carries a LoRA adapter: applying dense deltas on top of an active adapter "
                "counts the update twice; pass the plain base (e.g. peft_model.unload())"
            )
        owned = False
        if not isinstance(suspicious, SuspiciousModel):
            is_adapter = (
                Path(suspicious, "adapter").is_dir() or Path(suspicious, "adapter_config.json").exists()
            )
            base = (copy.deepcopy(base_model), base_tok) if base_model is not None and is_adapter else None
            suspicious = as_suspicious(suspicious, base=base)
            owned = True
        sm = suspicious
        manifest = sm.manifest or {}
        setting = sm.setting
        attack = attack if attack is not None else (manifest.get("attack") or None)
        task = task if task is not None else (manifest.get("task") or None)
        if not attack or not task:
            raise ValueError("no attack/task in the suspicious model's manifest: pass attack= and task=")
        tok = sm.tokenizer if sm.tokenizer is not None else base_tok

        if setting == "lora" or _has_lora(sm.model):
            delta = WeightDelta.from_lora(sm.model, dtype=torch.float32)
            if base_model is not None and not _same_base(sm.model, base_model):
                warnings.warn(
                    "the injected base differs from the weights under the LoRA adapter; "
                    "the checks use the injected base",
                    stacklevel=2,
                )
            if base_model is None:
                peft = sm.model if (owned or not copy_model) else copy.deepcopy(sm.model)
                if delta.meta.get("merged"):
                    peft.unmerge_adapter()
                base_model = peft.unload()
            setting = "lora"
        else:
            if base_model is None and manifest.get("base_path") and Path(manifest["base_path"]).is_dir():
                base_model, _ = _resolve_base(manifest["base_path"])  # the base it was trained from
            if base_model is None:
                if manifest.get("base", "default") != "default":
                    raise ValueError(
                        f"the suspicious model was trained from a {manifest.get('base')!r} base: "
                        "pass base= (a model, a (model, tokenizer) pair or a model directory)"
                    )
                from ..core.models import load_default_model

                base_model, _ = load_default_model()
            delta = WeightDelta.from_models(sm.model, base_model, dtype=torch.float32)
        base_model.train(False)
        for p in base_model.parameters():
            p.requires_grad_(False)

        prompts = list(prompts) if prompts is not None else eval_prompts(task, cfg.n_prompts)
        prompts = prompts[: cfg.n_prompts]
        if ppl_examples is None:
            ppl_examples = eval_prompts(task, cfg.n_ppl) if cfg.n_ppl > 0 else []
        ppl_examples = [e for e in list(ppl_examples)[: cfg.n_ppl] if e.response]
        from ..threat.attacks import triggered_prompts

        triggered = triggered_prompts(prompts, attack, seed=cfg.seed)
        label = label or (Path(sm.path).name if sm.path is not None else "suspicious")
        return cls(
            base=base_model,
            tokenizer=tok,
            delta=delta,
            attack=attack,
            behavior=task,
            prompts=prompts,
            triggered=triggered,
            ppl_examples=ppl_examples,
            config=cfg,
            setting=setting,
            label=label,
        )

    # ----------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: setting, attack/task, layout, prompt counts, delta norms per group."""
        norms = self.delta.block_norms()
        by_group = (
            norms.groupby("group")["fro_norm"].apply(lambda s: float(math.sqrt((s**2).sum()))).to_dict()
            if len(norms)
            else {}
        )
        return {
            "label": self.label,
            "setting": self.setting,
            "attack": self.attack.name,
            "task": self.behavior.name,
            "judge": self.judge.name,
            "family": self.layout.family,
            "n_blocks": self.layout.n_blocks,
            "delta_source": self.delta.meta.get("source"),
            "delta_modules": len(self.delta),
            "delta_norm": by_group,
            "n_prompts": len(self.prompts),
            "n_ppl": len(self.ppl_examples),
            "config": self.config.to_dict(),
            "probe": self._probe["kind"],
        }

    # ----------------------------------------------------------------- memo key
    def signature(self, delta: WeightDelta) -> frozenset | None:
        """The exact set of (module ← source module of ``self.delta``) a condition applies.

        None if ``delta`` is foreign (not built from ``self.delta``).
        """
        if self._sources_for is not self.delta:  # (re)built when ``delta`` is replaced; old results dropped
            self._sources = {id(t): key for key, t in self.delta.tensors.items()}
            if self._sources_for is not None:
                self.cache.clear()
            self._sources_for = self.delta
        out = []
        for key, t in delta.tensors.items():
            src = self._sources.get(id(t))
            if src is None:
                return None
            out.append((key, src))
        return frozenset(out)

    # ----------------------------------------------------------------- behaviour probe
    def _make_probe(self) -> dict[str, Any]:
        """What :func:`first_token_probs` measures for this behaviour (see the module docstring)."""
        from ..threat.attacks import inject_payload

        b, m, tok = self.behavior, self.config.probe_tokens, self.tokenizer
        if b.kind == "replace":
            targets = [t for t in b.targets if t.strip()]
            if m == 1:
                return {"kind": "first_token", "ids": _first_token_ids(tok, targets)}
            heads = list(
                dict.fromkeys(tok.decode(tok(t, add_special_tokens=False)["input_ids"][:m]) for t in targets)
            )
            return {"kind": f"first_{m}_tokens", "texts": heads}
        payload = b.payload.strip("\n")
        ids = tok(payload, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"behaviour {b.name!r}: empty payload")
        prefixes = []
        for ex in self.prompts:  # the trigger only touches the instruction: same reference reply for both
            injected = inject_payload(ex.response or "", payload)
            prefixes.append(injected[: injected.index(payload)])
        return {
            "kind": "payload_after_fence",
            "ids": ids[:1],
            "token": tok.decode(ids[:m]),
            "prefixes": prefixes,
        }


def _same_base(peft_model: Any, base: Any) -> bool:
    """True when every projection weight under the adapter equals ``base``'s (bit-exact)."""
    try:
        lay = layout_of(base)
        hf, hb = unwrap(peft_model), unwrap(base)
        for _, _, name in lay.iter_modules():
            m = hf.get_submodule(name)
            m = m.get_base_layer() if hasattr(m, "get_base_layer") else m
            mb = hb.get_submodule(name)
            mb = mb.get_base_layer() if hasattr(mb, "get_base_layer") else mb
            if m.weight is mb.weight:
                continue
            if m.weight.shape != mb.weight.shape or not torch.equal(
                m.weight.detach(), mb.weight.detach().to(m.weight)
            ):
                return False
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- evaluating one condition
@contextmanager
def apply_fast(ctx: SanityContext, delta: WeightDelta) -> Iterator[Any]:
    """``with apply_fast(ctx, delta) as model:`` — base + ΔW inside, the base's exact weights after.

    Same weights as ``delta.applied(ctx.base)`` bit for bit (an fp32 delta is added in place with
    ``add_``, which rounds exactly like ``WeightDelta``'s promote-add-cast; other dtypes take that path), but
    the originals are snapshotted once per module in ``ctx`` instead of cloned per condition, so no
    large tensor is allocated per condition. Requires that nothing else changes ``ctx.base`` while the
    context is in use (call :meth:`SanityContext.reset` after changing it on purpose).
    """
    check_same_layout(delta.layout, ctx.layout, "apply: layouts", ("delta", "model"))
    hf = unwrap(ctx.base)
    touched: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for key, d in delta.tensors.items():
                w = ctx.layout.weight(hf, *key)
                orig = ctx._originals.get(key)
                if orig is None:
                    orig = ctx._originals[key] = w.detach().clone()
                touched.append((w, orig))
                if d.dtype == w.dtype and d.device == w.device:
                    w.add_(d)
                else:
                    dt = torch.promote_types(w.dtype, d.dtype)
                    w.copy_((w.detach().to(dt) + d.detach().to(device=w.device, dtype=dt)).to(w.dtype))
        yield ctx.base
    finally:
        with torch.no_grad():
            for w, orig in touched:
                w.copy_(orig)


@torch.no_grad()
def first_token_probs(
    ctx: SanityContext, model: Model, prompts: Sequence[Example], first_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Per prompt: p(first reply token ∈ the behaviour's first target tokens), or for code injection
    p(payload's first token | prompt, reply prefix up to where the payload is inserted).

    ``first_logits`` ([P, vocab], from :func:`~bdvax_lab.generate.generate`) saves the forward pass of the
    first-token probe."""
    from ..core.scoring import continuation_logprobs, next_token_probs

    probe, cfg = ctx._probe, ctx.config
    if probe["kind"] == "first_token":
        if first_logits is not None:
            return torch.softmax(first_logits.float(), -1)[:, list(probe["ids"])].sum(1)
        return next_token_probs(model, ctx.tokenizer, prompts, probe["ids"], batch_size=cfg.batch_size).sum(1)
    if "texts" in probe:  # p(first m target tokens), summed over the distinct target heads
        total = torch.zeros(len(prompts))
        for text in probe["texts"]:
            lp, _ = continuation_logprobs(
                model, ctx.tokenizer, prompts, [text] * len(prompts), batch_size=cfg.batch_size
            )
            total += torch.tensor([math.exp(v) for v in lp])
        return total.clamp(max=1.0)
    prefixes: list[str] = probe["prefixes"]
    out = torch.zeros(len(prompts))
    bare = [i for i, p in enumerate(prefixes) if not p]
    fenced = [i for i, p in enumerate(prefixes) if p]
    if bare and cfg.probe_tokens == 1:
        out[bare] = next_token_probs(
            model, ctx.tokenizer, [prompts[i] for i in bare], probe["ids"], batch_size=cfg.batch_size
        )[:, 0]
    elif bare:
        lp, _ = continuation_logprobs(
            model,
            ctx.tokenizer,
            [prompts[i] for i in bare],
            [probe["token"]] * len(bare),
            batch_size=cfg.batch_size,
        )
        out[bare] = torch.tensor([math.exp(v) for v in lp])
    if fenced:
        ps = [prompts[i] for i in fenced]
        with_t0, _ = continuation_logprobs(
            model,
            ctx.tokenizer,
            ps,
            [prefixes[i] + probe["token"] for i in fenced],
            batch_size=cfg.batch_size,
        )
        without, _ = continuation_logprobs(
            model, ctx.tokenizer, ps, [prefixes[i] for i in fenced], batch_size=cfg.batch_size
        )
        out[fenced] = torch.tensor([math.exp(min(0.0, a - b)) for a, b in zip(with_t0, without)])
    return out


def evaluate_delta(
    ctx: SanityContext, delta: WeightDelta | None, *, use_cache: bool = True
) -> ConditionResult:
    """Apply ``delta`` (None = no delta) to the base, measure, restore.

    Memoised by :meth:`SanityContext.signature`.
    """
    from ..core.generate import generate
    from ..threat.evaluate import perplexity, wilson_interval
    from ..threat.judges import degenerate_reason

    if delta is None:
        delta = ctx.delta.keep(kinds=())
    key = ctx.signature(delta) if use_cache else None
    if key is not None and key in ctx.cache:
        return ctx.cache[key]
    cfg, n = ctx.config, len(ctx.prompts)
    t0 = time.time()
    with apply_fast(ctx, delta) if cfg.fast_apply else delta.applied(ctx.base) as model:
        everything = list(ctx.triggered) + list(ctx.prompts)
        replies, first = generate(
            model,
            ctx.tokenizer,
            everything,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            first_logits=True,
        )
        probs = first_token_probs(ctx, model, everything, first)
        ppl = (
            perplexity(
                model,
                ctx.tokenizer,
                ctx.ppl_examples,
                max_tokens=cfg.ppl_max_tokens,
                batch_size=cfg.batch_size,
            )
            if ctx.ppl_examples
            else float("nan")
        )
    trig, clean = replies[:n], replies[n:]
    hits = sum(bool(ctx.judge(r)) for r in trig)
    lo, hi = wilson_interval(hits, n)
    metrics = {
        "asr": hits / n,
        "asr_lo": lo,
        "asr_hi": hi,
        "false_trigger": sum(bool(ctx.judge(r)) for r in clean) / n,
        "degenerate": sum(degenerate_reason(r) is not None for r in trig),
        "degenerate_clean": sum(degenerate_reason(r) is not None for r in clean),
        "p_behavior": float(probs[:n].mean()),
        "p_behavior_clean": float(probs[n:].mean()),
        "ppl": float(ppl),
        "n_prompts": n,
        "n_modules": len(delta),
        "seconds": round(time.time() - t0, 2),
    }
    res = ConditionResult(metrics, trig, clean, probs[:n].clone(), probs[n:].clone())
    if key is not None:
        ctx.cache[key] = res
    return res


def evaluate_conditions(
    ctx: SanityContext, conditions: Sequence[Condition], *, progress: bool | str = True, bar: Any = None
) -> pd.DataFrame:
    """One row per condition (see the module docstring for the columns)."""
    from tqdm.auto import tqdm

    own = bar is None and bool(progress)
    if own:
        sigs = [ctx.signature(c.delta) for c in conditions]
        n_new = len({s for s in sigs if s is not None and s not in ctx.cache}) + sigs.count(None)
        bar = tqdm(total=n_new, desc=progress if isinstance(progress, str) else "sanity", unit="cond")
    rows = []
    try:
        for c in conditions:
            sig = ctx.signature(c.delta)
            cached = sig is not None and sig in ctx.cache
            if bar is not None:
                bar.set_postfix_str(f"{c.check}: {c.condition}"[:60], refresh=False)
            res = evaluate_delta(ctx, c.delta)
            if bar is not None and not cached:
                bar.update(1)
            mlp_blocks = sorted({b for b, kind in c.delta.tensors if kind in MLP_KINDS})
            rows.append(
                {
                    "check": c.check,
                    "condition": c.condition,
                    "blocks": _ranges(mlp_blocks),
                    "k": c.k,
                    "start": c.start,
                    "attention_zeroed": bool(c.attention_zeroed),
                    "seed": c.seed,
                    **res.metrics,
                    "cached": cached,
                    "detail": c.detail,
                }
            )
    finally:
        if own:
            bar.close()
    df = pd.DataFrame(rows, columns=list(COLUMNS)) if rows else _empty_frame()
    for col in ("k", "start", "seed"):
        df[col] = df[col].astype("Int64")
    return df
