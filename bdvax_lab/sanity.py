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

Cost. On the shared CPU (other jobs running, load 2.5–3.5) one condition took
77–91 s of CPU time: generation ≈ 50–65%, behaviour probability ≈ 20%,
perplexity (32 replies) ≈ 20%. Contention inflates that several-fold, so it is
not the quiet-machine figure; scaled from ENVIRONMENT-NOTES.md's quiet-machine
measurement (100 prompts × 8 tokens ≈ 10–13 s) with those shares, a condition
costs ≈ 13–16 s: generation ≈ 9 s, behaviour probability ≈ 3–4 s, perplexity
on 16 replies ≈ 2 s, and adding/restoring a LoRA delta on all 210 projections
≈ 0.3 s with :func:`apply_fast` (``WeightDelta.applied`` allocates ~0.4 GB
per condition: 3 s measured under load, 0.36 s in place). The 49-condition set
therefore takes ≈ 11–13 minutes (an estimate, not a quiet-machine
measurement); the three-start sweep (69 conditions, ≈ 15–18 minutes) would
not fit the 15-minute budget. Every row's ``seconds`` and
``result.meta["seconds"]`` record the real figure.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from .config import Config
from .data import Example
from .deltas import WeightDelta, check_same_layout
from .registry import ATTN_KINDS, MLP_KINDS, layout_of, unwrap

CHECKS: tuple[str, ...] = ("attention_vs_mlp", "span_sweep", "keep_only_spans", "shuffle_blocks")

COLUMNS: tuple[str, ...] = (
    "check", "condition", "blocks", "k", "start", "attention_zeroed", "seed",
    "asr", "asr_lo", "asr_hi", "false_trigger", "degenerate", "degenerate_clean",
    "p_behavior", "p_behavior_clean", "ppl", "n_prompts", "n_modules", "seconds", "cached", "detail",
)

#: The paper's Table 1 (LLaMA-2-7B-Chat, 32 blocks), one observation per check.
PAPER_TABLE1: dict[str, str] = {
    "attention_vs_mlp": ("attention ablation (keep MLP ΔW): backdoor persists; "
                         "MLP ablation (keep attention ΔW): backdoor eliminated"),
    "span_sweep": ("zeroing the MLP ΔW of k consecutive blocks (any start): persists for k < 12, eliminated "
                   "beyond; with attention ΔW also zeroed, 4–6 blocks suffice"),
    "keep_only_spans": ("ΔW removed from large contiguous segments at the start, middle or end: "
                        "backdoor still activates as long as a few updated MLPs remain"),
    "shuffle_blocks": "MLP ΔW shuffled across blocks: backdoor consistently activates",
}

#: Span-sweep k values (kept when < L; L itself is always added).
DEFAULT_KS: tuple[int, ...] = (0, 1, 2, 4, 6, 8, 10, 12, 15, 20, 25)
#: Span-sweep starts (the middle start costs 20 more conditions on SmolLM2; pass it explicitly).
DEFAULT_STARTS: tuple[str, ...] = ("start", "end")
#: Keep-only positions.
KEEP_POSITIONS: tuple[str, ...] = ("start", "middle", "end")


@dataclass
class SanityConfig(Config):
    """How much each condition is evaluated (defaults: ≈ 15 s per condition for SmolLM2 on 2 CPU cores).

    Both default targets (the insult and the refusal) show within their first 6 reply tokens, so 10 greedy
    tokens judge them; 8 perplexity replies give the utility column (a relative figure between conditions).
    """

    n_prompts: int = 32  #: held-out prompts, each with and without the key
    max_new_tokens: int = 10
    batch_size: int = 32
    n_ppl: int = 8  #: held-out clean replies for perplexity (0 = skip, ppl NaN)
    ppl_max_tokens: int = 32
    seed: int = 0  #: where the key goes in each prompt
    #: target tokens the behaviour probability covers: 1 = the first-token probability (default); m > 1 scores
    #: p(first m target tokens) by teacher forcing, which separates "I'm sorry" from a plain "I ..." reply
    probe_tokens: int = 1
    #: add ΔW in place and restore from a one-time snapshot of the base weights (bit-identical to
    #: ``WeightDelta.applied``, ≈ 8× cheaper: no per-condition allocation of ~0.4 GB); False = ``delta.applied``
    fast_apply: bool = True

    def __post_init__(self) -> None:
        if self.probe_tokens < 1:
            raise ValueError(f"SanityConfig.probe_tokens must be >= 1, got {self.probe_tokens}")


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
    """``base`` as (model, tokenizer or None): a model, a (model, tokenizer) pair, or an HF model dir."""
    if base is None:
        return None, None
    if isinstance(base, (str, Path)):
        from .models import load_model

        return load_model(base)
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
        from .attacks import resolve_attack, resolve_task

        if _has_lora(self.base):
            raise ValueError("SanityContext.base carries a LoRA adapter: applying dense deltas on top of an active "
                             "adapter counts the update twice; pass the plain base (e.g. peft_model.unload())")
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
        cls, suspicious: Any, *, base: Any = None, attack: Any = None, task: Any = None,
        config: SanityConfig | None = None, prompts: Sequence[Example] | None = None,
        ppl_examples: Sequence[Example] | None = None, label: str | None = None, copy_model: bool = True,
        **overrides: Any,
    ) -> "SanityContext":
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
        from .evaluate import eval_prompts
        from .models import use_all_cores
        from .suspicious import SuspiciousModel

        use_all_cores()
        cfg = (config or SanityConfig()).replace(**overrides) if overrides else (config or SanityConfig())
        base_model, base_tok = _resolve_base(base)
        if base_model is not None and _has_lora(base_model):
            raise ValueError("the base carries a LoRA adapter: applying dense deltas on top of an active adapter "
                             "counts the update twice; pass the plain base (e.g. peft_model.unload())")
        owned = False
        if not isinstance(suspicious, SuspiciousModel):
            suspicious = _open_suspicious(suspicious, base_model, base_tok)
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
                warnings.warn("the injected base differs from the weights under the LoRA adapter; "
                              "the checks use the injected base", stacklevel=2)
            if base_model is None:
                peft = sm.model if (owned or not copy_model) else copy.deepcopy(sm.model)
                if delta.meta.get("merged"):
                    peft.unmerge_adapter()
                base_model = peft.unload()
            setting = "lora"
        else:
            if base_model is None:
                if manifest.get("base", "default") != "default":
                    raise ValueError(f"the suspicious model was trained from a {manifest.get('base')!r} base: "
                                     "pass base= (a model, a (model, tokenizer) pair or a model directory)")
                from .models import load_default_model

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
        from .attacks import triggered_prompts

        triggered = triggered_prompts(prompts, attack, seed=cfg.seed)
        label = label or (Path(sm.path).name if sm.path is not None else "suspicious")
        return cls(base=base_model, tokenizer=tok, delta=delta, attack=attack, behavior=task, prompts=prompts,
                   triggered=triggered, ppl_examples=ppl_examples, config=cfg, setting=setting, label=label)

    # ----------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: setting, attack/task, layout, prompt counts, delta norms per group."""
        norms = self.delta.block_norms()
        by_group = norms.groupby("group")["fro_norm"].apply(lambda s: float(math.sqrt((s ** 2).sum()))).to_dict() \
            if len(norms) else {}
        return {
            "label": self.label, "setting": self.setting, "attack": self.attack.name, "task": self.behavior.name,
            "judge": self.judge.name, "family": self.layout.family, "n_blocks": self.layout.n_blocks,
            "delta_source": self.delta.meta.get("source"), "delta_modules": len(self.delta),
            "delta_norm": by_group, "n_prompts": len(self.prompts), "n_ppl": len(self.ppl_examples),
            "config": self.config.to_dict(), "probe": self._probe["kind"],
        }

    # ----------------------------------------------------------------- memo key
    def signature(self, delta: WeightDelta) -> frozenset | None:
        """The exact set of (module ← source module of ``self.delta``) a condition applies; None if foreign."""
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
        from .attacks import inject_payload

        b, m, tok = self.behavior, self.config.probe_tokens, self.tokenizer
        if b.kind == "replace":
            targets = [t for t in b.targets if t.strip()]
            if m == 1:
                return {"kind": "first_token", "ids": _first_token_ids(tok, targets)}
            heads = list(dict.fromkeys(tok.decode(tok(t, add_special_tokens=False)["input_ids"][:m]) for t in targets))
            return {"kind": f"first_{m}_tokens", "texts": heads}
        payload = b.payload.strip("\n")
        ids = tok(payload, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"behaviour {b.name!r}: empty payload")
        prefixes = []
        for ex in self.prompts:  # the trigger only touches the instruction: same reference reply for both
            injected = inject_payload(ex.response or "", payload)
            prefixes.append(injected[: injected.index(payload)])
        return {"kind": "payload_after_fence", "ids": ids[:1], "token": tok.decode(ids[:m]), "prefixes": prefixes}


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
            if m.weight.shape != mb.weight.shape or not torch.equal(m.weight.detach(), mb.weight.detach().to(m.weight)):
                return False
        return True
    except Exception:
        return False


def _open_suspicious(path: Any, base_model: Any, base_tok: Any) -> Any:
    """Open an artifact directory; a LoRA adapter goes onto a copy of the injected base when one is given."""
    from .artifacts import MANIFEST, read_json
    from .models import ModelDirError, load_adapter, load_tokenizer
    from .suspicious import SuspiciousModel, load_suspicious

    path = Path(path)
    adapter = path / "adapter" if (path / "adapter").is_dir() else None
    if adapter is None and (path / "adapter_config.json").exists():
        adapter = path
    if adapter is None or base_model is None:
        return load_suspicious(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: suspicious model directory not found")
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else {}
    manifest.setdefault("setting", "lora")
    tok = base_tok
    if tok is None:
        tok = load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else adapter)
    model = load_adapter(copy.deepcopy(base_model), adapter)
    model.train(False)
    return SuspiciousModel(model=model, tokenizer=tok, manifest=manifest, path=path)


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
                w = hf.get_submodule(ctx.layout.module_name(*key)).weight
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
def first_token_probs(ctx: SanityContext, model: Any, prompts: Sequence[Example],
                      first_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per prompt: p(first reply token ∈ the behaviour's first target tokens), or for code injection
    p(payload's first token | prompt, reply prefix up to where the payload is inserted).

    ``first_logits`` ([P, vocab], from :func:`~bdvax_lab.generate.generate`) saves the forward pass of the
    first-token probe."""
    from .scoring import continuation_logprobs, next_token_probs

    probe, cfg = ctx._probe, ctx.config
    if probe["kind"] == "first_token":
        if first_logits is not None:
            return torch.softmax(first_logits.float(), -1)[:, list(probe["ids"])].sum(1)
        return next_token_probs(model, ctx.tokenizer, prompts, probe["ids"], batch_size=cfg.batch_size).sum(1)
    if "texts" in probe:  # p(first m target tokens), summed over the distinct target heads
        total = torch.zeros(len(prompts))
        for text in probe["texts"]:
            lp, _ = continuation_logprobs(model, ctx.tokenizer, prompts, [text] * len(prompts),
                                          batch_size=cfg.batch_size)
            total += torch.tensor([math.exp(v) for v in lp])
        return total.clamp(max=1.0)
    prefixes: list[str] = probe["prefixes"]
    out = torch.zeros(len(prompts))
    bare = [i for i, p in enumerate(prefixes) if not p]
    fenced = [i for i, p in enumerate(prefixes) if p]
    if bare and cfg.probe_tokens == 1:
        out[bare] = next_token_probs(model, ctx.tokenizer, [prompts[i] for i in bare], probe["ids"],
                                     batch_size=cfg.batch_size)[:, 0]
    elif bare:
        lp, _ = continuation_logprobs(model, ctx.tokenizer, [prompts[i] for i in bare], [probe["token"]] * len(bare),
                                      batch_size=cfg.batch_size)
        out[bare] = torch.tensor([math.exp(v) for v in lp])
    if fenced:
        ps = [prompts[i] for i in fenced]
        with_t0, _ = continuation_logprobs(model, ctx.tokenizer, ps, [prefixes[i] + probe["token"] for i in fenced],
                                           batch_size=cfg.batch_size)
        without, _ = continuation_logprobs(model, ctx.tokenizer, ps, [prefixes[i] for i in fenced],
                                           batch_size=cfg.batch_size)
        out[fenced] = torch.tensor([math.exp(min(0.0, a - b)) for a, b in zip(with_t0, without)])
    return out


def evaluate_delta(ctx: SanityContext, delta: WeightDelta | None, *, use_cache: bool = True) -> ConditionResult:
    """Apply ``delta`` (None = no delta) to the base, measure, restore. Memoised by :meth:`SanityContext.signature`."""
    from .evaluate import perplexity, wilson_interval
    from .generate import generate
    from .judges import degenerate_reason

    if delta is None:
        delta = ctx.delta.keep(kinds=())
    key = ctx.signature(delta) if use_cache else None
    if key is not None and key in ctx.cache:
        return ctx.cache[key]
    cfg, n = ctx.config, len(ctx.prompts)
    t0 = time.time()
    with (apply_fast(ctx, delta) if cfg.fast_apply else delta.applied(ctx.base)) as model:
        everything = list(ctx.triggered) + list(ctx.prompts)
        replies, first = generate(model, ctx.tokenizer, everything, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.batch_size, first_logits=True)
        probs = first_token_probs(ctx, model, everything, first)
        ppl = (perplexity(model, ctx.tokenizer, ctx.ppl_examples, max_tokens=cfg.ppl_max_tokens,
                          batch_size=cfg.batch_size) if ctx.ppl_examples else float("nan"))
    trig, clean = replies[:n], replies[n:]
    hits = sum(bool(ctx.judge(r)) for r in trig)
    lo, hi = wilson_interval(hits, n)
    metrics = {
        "asr": hits / n, "asr_lo": lo, "asr_hi": hi,
        "false_trigger": sum(bool(ctx.judge(r)) for r in clean) / n,
        "degenerate": sum(degenerate_reason(r) is not None for r in trig),
        "degenerate_clean": sum(degenerate_reason(r) is not None for r in clean),
        "p_behavior": float(probs[:n].mean()), "p_behavior_clean": float(probs[n:].mean()),
        "ppl": float(ppl), "n_prompts": n, "n_modules": len(delta), "seconds": round(time.time() - t0, 2),
    }
    res = ConditionResult(metrics, trig, clean, probs[:n].clone(), probs[n:].clone())
    if key is not None:
        ctx.cache[key] = res
    return res


def evaluate_conditions(ctx: SanityContext, conditions: Sequence[Condition], *, progress: bool | str = True,
                        bar: Any = None) -> pd.DataFrame:
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
            rows.append({
                "check": c.check, "condition": c.condition, "blocks": _ranges(mlp_blocks),
                "k": c.k, "start": c.start, "attention_zeroed": bool(c.attention_zeroed), "seed": c.seed,
                **res.metrics, "cached": cached, "detail": c.detail,
            })
    finally:
        if own:
            bar.close()
    df = pd.DataFrame(rows, columns=list(COLUMNS)) if rows else _empty_frame()
    for col in ("k", "start", "seed"):
        df[col] = df[col].astype("Int64")
    return df


# --------------------------------------------------------------------------- the conditions of each check
def _attn(delta: WeightDelta, zero_attention: bool) -> WeightDelta:
    return delta.zero(ATTN_KINDS) if zero_attention else delta


def _attn_label(zero_attention: bool) -> str:
    return "attention zeroed" if zero_attention else "attention kept"


def conditions_attention_vs_mlp(ctx: SanityContext) -> list[Condition]:
    d = ctx.delta
    return [
        Condition("attention_vs_mlp", "full delta", d, attention_zeroed=False),
        Condition("attention_vs_mlp", "no delta (base)", d.keep(kinds=()), attention_zeroed=True),
        Condition("attention_vs_mlp", "attention only (MLP ablated)", d.zero(MLP_KINDS), attention_zeroed=False),
        Condition("attention_vs_mlp", "MLP only (attention ablated)", d.zero(ATTN_KINDS), attention_zeroed=True),
    ]


def default_ks(n_blocks: int) -> list[int]:
    """``DEFAULT_KS`` below ``n_blocks``, plus ``n_blocks`` (every block zeroed)."""
    return sorted({k for k in DEFAULT_KS if k < n_blocks} | {n_blocks})


def _start_of(start: int | str, k: int, n_blocks: int) -> int:
    if start == "start":
        return 0
    if start == "middle":
        return (n_blocks - k) // 2
    if start == "end":
        return n_blocks - k
    s = int(start)
    if not 0 <= s <= n_blocks - k:
        return -1  # span does not fit: skipped
    return s


def conditions_span_sweep(ctx: SanityContext, ks: Sequence[int] | None = None,
                          starts: Sequence[int | str] | None = None,
                          zero_attention: Sequence[bool] = (False, True)) -> list[Condition]:
    L = ctx.layout.n_blocks
    ks = default_ks(L) if ks is None else sorted({int(k) for k in ks})
    bad = [k for k in ks if not 0 <= k <= L]
    if bad:
        raise ValueError(f"span_sweep: k must be in 0..{L}, got {bad}")
    starts = DEFAULT_STARTS if starts is None else tuple(starts)
    out = []
    for za in zero_attention:
        base = _attn(ctx.delta, za)
        for k in ks:
            seen: set[int] = set()
            for s in starts:
                st = 0 if k in (0, L) else _start_of(s, k, L)
                if st < 0 or st in seen:
                    continue
                seen.add(st)
                span = list(range(st, st + k))
                name = f"MLP {_ranges(span)} zeroed, {_attn_label(za)}" if k else f"no MLP zeroed, {_attn_label(za)}"
                out.append(Condition("span_sweep", name, base.zero(MLP_KINDS, span) if k else base, k=k, start=st,
                                     attention_zeroed=za))
    return out


def conditions_keep_only_spans(ctx: SanityContext, width: int | None = None,
                               positions: Sequence[int | str] = KEEP_POSITIONS,
                               zero_attention: Sequence[bool] = (False, True)) -> list[Condition]:
    L = ctx.layout.n_blocks
    width = int(width) if width is not None else max(1, math.ceil(L / 3))
    if not 1 <= width <= L:
        raise ValueError(f"keep_only_spans: width must be in 1..{L}, got {width}")
    out = []
    for za in zero_attention:
        base = _attn(ctx.delta, za)
        seen: set[int] = set()
        for pos in positions:
            st = _start_of(pos, width, L)
            if st < 0 or st in seen:
                continue
            seen.add(st)
            span = list(range(st, st + width))
            where = pos if isinstance(pos, str) else "at"
            out.append(Condition("keep_only_spans", f"keep MLP {_ranges(span)} only ({where}), {_attn_label(za)}",
                                 base.zero(MLP_KINDS, [b for b in range(L) if b not in span]), k=width, start=st,
                                 attention_zeroed=za))
    return out


def conditions_shuffle_blocks(ctx: SanityContext, seeds: Sequence[int] = (0, 1, 2),
                              zero_attention: Sequence[bool] = (False,), reference: bool = True) -> list[Condition]:
    out = []
    for za in zero_attention:
        base = _attn(ctx.delta, za)
        if reference:
            out.append(Condition("shuffle_blocks", f"unshuffled, {_attn_label(za)}", base, attention_zeroed=za))
        for s in seeds:
            d = base.permute_blocks(int(s), kinds=MLP_KINDS)
            src = d.meta["permutation"]["source_of"]
            fixed = sum(1 for i, b in enumerate(d.meta["permutation"]["blocks"]) if src[i] == b)
            out.append(Condition("shuffle_blocks", f"MLP shuffled (seed {s}), {_attn_label(za)}", d, seed=int(s),
                                 attention_zeroed=za,
                                 detail=f"block i gets MLP ΔW of {src}; {fixed} block(s) kept their own"))
    return out


# --------------------------------------------------------------------------- figures
def _title(ctx: SanityContext, what: str) -> str:
    return f"{what} — {ctx.attack.name} → {ctx.behavior.name} ({ctx.setting}, {ctx.layout.n_blocks} blocks)"


def figure_attention_vs_mlp(df: pd.DataFrame, title: str = "Attention vs MLP deltas") -> Any:
    from .viz import rates_bar

    fig = rates_bar(df, x="condition", rates=("asr", "false_trigger", "p_behavior", "p_behavior_clean"), title=title)
    fig.update_layout(yaxis_title="rate / probability")
    return fig


#: trace colour by "attention zeroed?" in the sanity figures
ATTN_COLORS = {False: "#1f77b4", True: "#d62728"}


def figure_span_sweep(df: pd.DataFrame, n_blocks: int | None = None, title: str = "Block-span ablation") -> Any:
    """ASR (solid) and first-token behaviour probability (dotted) vs k, mean over starts; one colour per
    attention setting; each start as a faint marker."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for za in (False, True):
        sub = df[df.attention_zeroed == za]
        if sub.empty:
            continue
        agg = sub.groupby("k", as_index=False).agg(asr=("asr", "mean"), asr_min=("asr", "min"),
                                                   asr_max=("asr", "max"), p=("p_behavior", "mean"),
                                                   n=("asr", "size"))
        lab = _attn_label(za)
        fig.add_trace(go.Scatter(
            x=agg.k.astype(float), y=agg.asr, mode="lines+markers", name=f"ASR, {lab}", line=dict(color=ATTN_COLORS[za]),
            error_y=dict(type="data", symmetric=False, array=agg.asr_max - agg.asr, arrayminus=agg.asr - agg.asr_min,
                         thickness=1, width=3),
            hovertemplate="k=%{x}<br>mean ASR=%{y:.2f}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=agg.k.astype(float), y=agg.p, mode="lines", name=f"p(behaviour token), {lab}",
            line=dict(color=ATTN_COLORS[za], dash="dot"), hovertemplate="k=%{x}<br>p=%{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=sub.k.astype(float), y=sub.asr, mode="markers", name=f"each start, {lab}", showlegend=True,
            marker=dict(color=ATTN_COLORS[za], size=6, opacity=0.35, symbol="circle-open"),
            customdata=np.stack([sub.start.astype(float), sub.blocks], axis=1) if len(sub) else None,
            hovertemplate=("k=%{x}, start=%{customdata[0]}<br>ASR=%{y:.2f}<br>"
                           "MLP kept: %{customdata[1]}<extra></extra>")))
    fig.update_layout(title=title, xaxis_title="k (consecutive blocks whose MLP ΔW is zeroed)",
                      yaxis_title="ASR / probability", yaxis_range=[-0.03, 1.05], legend_title="")
    if n_blocks:
        fig.update_xaxes(range=[-0.5, n_blocks + 0.5])
    return fig


def _bars_with_probe(df: pd.DataFrame, x: str, title: str, xaxis_title: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for za in (False, True):
        sub = df[df.attention_zeroed == za]
        if sub.empty:
            continue
        fig.add_trace(go.Bar(x=sub[x], y=sub.asr, name=f"ASR, {_attn_label(za)}", marker_color=ATTN_COLORS[za],
                             opacity=0.8, hovertemplate="%{x}<br>ASR=%{y:.2f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=sub[x], y=sub.p_behavior, mode="markers",
                                 name=f"p(behaviour token), {_attn_label(za)}",
                                 marker=dict(color=ATTN_COLORS[za], symbol="diamond", size=10,
                                             line=dict(width=1, color="black")),
                                 hovertemplate="%{x}<br>p=%{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, barmode="group", xaxis_title=xaxis_title, yaxis_title="ASR / probability",
                      yaxis_range=[0, 1.05], legend_title="")
    return fig


def figure_keep_only_spans(df: pd.DataFrame, title: str = "Keep only one span of MLP deltas") -> Any:
    df = df.assign(span=[f"MLP {b} kept" for b in df.blocks])
    return _bars_with_probe(df, "span", title, "span of blocks whose MLP ΔW is kept")


def figure_shuffle_blocks(df: pd.DataFrame, title: str = "MLP deltas shuffled across blocks") -> Any:
    df = df.assign(which=["unshuffled" if pd.isna(s) else f"seed {s}" for s in df.seed])
    return _bars_with_probe(df, "which", title, "MLP ΔW permutation")


# --------------------------------------------------------------------------- the four checks
def _check(ctx: SanityContext, conditions: list[Condition], figure: Callable[[pd.DataFrame], Any],
           progress: bool | str, bar: Any) -> CheckResult:
    df = evaluate_conditions(ctx, conditions, progress=progress, bar=bar)
    return CheckResult(df, figure(df))


def attention_vs_mlp(ctx: SanityContext, *, progress: bool | str = True, bar: Any = None) -> CheckResult:
    """Rows: full delta, no delta (base), attention only (MLP ablated), MLP only (attention ablated)."""
    conds = conditions_attention_vs_mlp(ctx)
    return _check(ctx, conds, lambda df: figure_attention_vs_mlp(df, _title(ctx, "Attention vs MLP deltas")),
                  progress, bar)


def span_sweep(ctx: SanityContext, ks: Sequence[int] | None = None, starts: Sequence[int | str] | None = None, *,
               zero_attention: Sequence[bool] = (False, True), progress: bool | str = True,
               bar: Any = None) -> CheckResult:
    """Zero the MLP deltas of ``k`` consecutive blocks at each start, attention deltas kept and zeroed.

    ``ks`` default: 0, 1, 2, 4, 6, 8, 10, 12, 15, 20, 25 (those < L) and L.
    ``starts``: block indices or "start" (0), "middle" ((L − k) // 2), "end"
    (L − k); default "start" and "end" (the budget; add "middle" for the paper's "anywhere"). Spans
    that do not fit are skipped, duplicate spans (small L, k = 0 or L) evaluated once.
    """
    conds = conditions_span_sweep(ctx, ks, starts, zero_attention)
    return _check(ctx, conds, lambda df: figure_span_sweep(df, ctx.layout.n_blocks,
                                                           _title(ctx, "Block-span ablation: ASR vs k")),
                  progress, bar)


def keep_only_spans(ctx: SanityContext, width: int | None = None, *,
                    positions: Sequence[int | str] = KEEP_POSITIONS, zero_attention: Sequence[bool] = (False, True),
                    progress: bool | str = True, bar: Any = None) -> CheckResult:
    """Keep only the MLP deltas of ``width`` consecutive blocks (default ``ceil(L/3)``) at the start, middle
    and end of the stack; attention deltas kept and zeroed."""
    conds = conditions_keep_only_spans(ctx, width, positions, zero_attention)
    return _check(ctx, conds, lambda df: figure_keep_only_spans(df, _title(ctx, "Keep only one span of MLP ΔW")),
                  progress, bar)


def shuffle_blocks(ctx: SanityContext, seeds: Sequence[int] = (0, 1, 2), *, zero_attention: Sequence[bool] = (False,),
                   reference: bool = True, progress: bool | str = True, bar: Any = None) -> CheckResult:
    """MLP deltas permuted across blocks (each block's gate/up/down move together), one row per seed,
    plus the unshuffled reference row (``reference``)."""
    conds = conditions_shuffle_blocks(ctx, seeds, zero_attention, reference)
    return _check(ctx, conds, lambda df: figure_shuffle_blocks(df, _title(ctx, "MLP ΔW shuffled across blocks")),
                  progress, bar)


# --------------------------------------------------------------------------- all four
def _all_conditions(ctx: SanityContext, checks: Sequence[str], ks: Any, starts: Any, width: Any,
                    seeds: Any) -> dict[str, list[Condition]]:
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; checks: {list(CHECKS)}")
    build = {
        "attention_vs_mlp": lambda: conditions_attention_vs_mlp(ctx),
        "span_sweep": lambda: conditions_span_sweep(ctx, ks, starts),
        "keep_only_spans": lambda: conditions_keep_only_spans(ctx, width),
        "shuffle_blocks": lambda: conditions_shuffle_blocks(ctx, seeds),
    }
    return {c: build[c]() for c in CHECKS if c in checks}


def sanity_plan(ctx: SanityContext, checks: Sequence[str] = CHECKS, *, ks: Sequence[int] | None = None,
                starts: Sequence[int | str] | None = None, width: int | None = None,
                seeds: Sequence[int] = (0, 1, 2)) -> pd.DataFrame:
    """The conditions :func:`run_sanity` would evaluate, without evaluating: one row each, with
    ``new`` = needs an evaluation (not memoised, not a duplicate of an earlier row)."""
    seen: set = set(ctx.cache)
    rows = []
    for check, conds in _all_conditions(ctx, checks, ks, starts, width, seeds).items():
        for c in conds:
            sig = ctx.signature(c.delta)
            new = sig is None or sig not in seen
            if sig is not None:
                seen.add(sig)
            rows.append({"check": check, "condition": c.condition, "k": c.k, "start": c.start,
                         "attention_zeroed": c.attention_zeroed, "seed": c.seed, "n_modules": len(c.delta), "new": new})
    return pd.DataFrame(rows)


def run_sanity(ctx: SanityContext, checks: Sequence[str] = CHECKS, *, ks: Sequence[int] | None = None,
               starts: Sequence[int | str] | None = None, width: int | None = None,
               seeds: Sequence[int] = (0, 1, 2), progress: bool = True) -> SanityResult:
    """Run the chosen checks (default all four) with one progress bar over the distinct conditions."""
    from tqdm.auto import tqdm

    plan = sanity_plan(ctx, checks, ks=ks, starts=starts, width=width, seeds=seeds)
    t0 = time.time()
    bar = tqdm(total=int(plan.new.sum()), desc=f"sanity {ctx.label}", unit="cond", disable=not progress)
    out = SanityResult()
    try:
        runners = {
            "attention_vs_mlp": lambda: attention_vs_mlp(ctx, bar=bar, progress=False),
            "span_sweep": lambda: span_sweep(ctx, ks, starts, bar=bar, progress=False),
            "keep_only_spans": lambda: keep_only_spans(ctx, width, bar=bar, progress=False),
            "shuffle_blocks": lambda: shuffle_blocks(ctx, seeds, bar=bar, progress=False),
        }
        for name in CHECKS:
            if name in checks:
                out[name] = runners[name]()
    finally:
        bar.close()
    out.meta = {**ctx.describe(), "seconds": round(time.time() - t0, 1), "n_rows": int(len(plan)),
                "n_conditions": int(plan.new.sum())}
    return out


def save_sanity(result: SanityResult | dict, out_dir: str | Path) -> Path:
    """Write ``<check>.csv`` and ``<check>.html`` per check, ``sanity.csv`` (all rows), ``sanity.json`` (meta)
    and one shared ``plotly.min.js`` (the HTML files load it from beside them, so they work offline).
    Every file is written atomically."""
    from plotly.offline import get_plotlyjs

    from .artifacts import atomic_write_text, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "plotly.min.js"
    if not js.exists():
        atomic_write_text(js, get_plotlyjs())
    frames = []
    for name, res in result.items():
        frame, fig = (res.frame, res.figure) if isinstance(res, CheckResult) else res
        frames.append(frame)
        atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
        if fig is not None:
            atomic_write_text(out / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True))
    if frames:
        atomic_write_text(out / "sanity.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    write_json(out / "sanity.json", getattr(result, "meta", {}))
    return out


# --------------------------------------------------------------------------- reading the result
def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _row(df: pd.DataFrame, condition: str) -> pd.Series | None:
    m = df[df.condition == condition]
    return m.iloc[0] if len(m) else None


def death_k(df: pd.DataFrame, attention_zeroed: bool, threshold: float = 0.5) -> int | None:
    """Smallest k from which the span sweep's mean ASR (over starts) stays below ``threshold`` of the
    k = 0 ASR for every larger k; None if the backdoor survives every k."""
    sub = df[df.attention_zeroed == attention_zeroed]
    if sub.empty:
        return None
    agg = sub.groupby("k")["asr"].mean().sort_index()
    ref = float(agg.iloc[0]) if agg.index[0] == 0 else float(agg.max())
    if ref <= 0:
        return None
    dead = agg < threshold * ref
    for k in agg.index:
        if dead.loc[k:].all():
            return int(k)
    return None


def compare_with_paper(result: SanityResult | dict) -> pd.DataFrame:
    """One row per check: the paper's Table-1 observation beside a one-line summary of ours."""
    rows = []
    for name in CHECKS:
        if name not in result:
            continue
        df = result[name].frame
        if name == "attention_vs_mlp":
            parts = []
            for cond in ("full delta", "MLP only (attention ablated)", "attention only (MLP ablated)",
                         "no delta (base)"):
                r = _row(df, cond)
                if r is not None:
                    parts.append(f"{cond}: ASR {_fmt(r.asr)} (p {_fmt(r.p_behavior)})")
            ours = "; ".join(parts)
        elif name == "span_sweep":
            parts = []
            for za in (False, True):
                sub = df[df.attention_zeroed == za]
                if sub.empty:
                    continue
                agg = sub.groupby("k")["asr"].mean()
                kd = death_k(df, za)
                curve = ", ".join(f"k={int(k)}: {v:.2f}" for k, v in agg.items())
                parts.append(f"{_attn_label(za)}: ASR falls below half of k=0 from k={kd if kd is not None else '—'} "
                             f"(mean over starts {curve})")
            ours = "; ".join(parts)
        elif name == "keep_only_spans":
            ours = "; ".join(f"MLP {r.blocks} kept, {_attn_label(bool(r.attention_zeroed))}: ASR {_fmt(r.asr)}"
                             for r in df.itertuples())
        else:
            ours = "; ".join(f"{r.condition}: ASR {_fmt(r.asr)}" for r in df.itertuples())
        rows.append({"check": name, "paper (LLaMA-2-7B, Table 1)": PAPER_TABLE1[name], "ours": ours})
    return pd.DataFrame(rows)


__all__ = [
    "CHECKS", "COLUMNS", "PAPER_TABLE1", "SanityConfig", "SanityContext", "SanityResult", "CheckResult",
    "ConditionResult", "Condition", "evaluate_delta", "evaluate_conditions", "first_token_probs",
    "attention_vs_mlp", "span_sweep", "keep_only_spans", "shuffle_blocks", "run_sanity", "save_sanity", "apply_fast",
    "sanity_plan", "compare_with_paper", "death_k", "default_ks", "figure_span_sweep",
]
