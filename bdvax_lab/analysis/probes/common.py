"""What every probe shares: result container, prompt batches, the nnsight wrapper and its runner."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ...core.batching import left_pad, pad_positions, pad_token
from ...core.data import Example, format_prompt
from ...core.registry import Layout, layout_of, unwrap

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model

#: Activation sites, in execution order inside a decoder block.
SITES: tuple[str, ...] = ("attn_output", "mlp_hidden", "mlp_output", "block")


DIRECTIONS: tuple[str, ...] = ("clean->triggered", "triggered->clean")


POSITIONS: tuple[str, ...] = ("last", "suffix")


MODES: tuple[str, ...] = ("zero", "mean")


#: Documented columns of each probe's frame.
DIFF_COLUMNS = [
    "model",
    "layer",
    "site",
    "norm_diff",
    "cosine",
    "rel_norm_diff",
    "consistency",
    "norm_clean",
    "norm_triggered",
    "n_pairs",
]


ABLATION_COLUMNS = [
    "model",
    "condition",
    "span",
    "blocks",
    "site",
    "mode",
    "p_behavior",
    "p_std",
    "delta_vs_baseline",
    "n_prompts",
]


PATCHING_COLUMNS = [
    "model",
    "direction",
    "positions",
    "layer",
    "site",
    "effect",
    "normalized",
    "ld_patched",
    "ld_target",
    "ld_source",
    "n_pairs",
]


LENS_COLUMNS = ["model", "prompts", "layer", "prob", "log_prob", "rank", "n_prompts"]


# --------------------------------------------------------------------------- results
@dataclass
class ProbeResult:
    """What every probe returns: a tidy ``frame``, a plotly ``figure`` and, for patching,
    a ``tensor``; ``per_prompt`` keeps per-prompt values where a probe has them."""

    frame: pd.DataFrame
    figure: Any = None
    tensor: torch.Tensor | None = None
    per_prompt: pd.DataFrame | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shape = "" if self.tensor is None else f", tensor={tuple(self.tensor.shape)}"
        name = self.meta.get("probe", "probe")
        return f"ProbeResult({name}: {len(self.frame)} rows{shape})\n{self.frame.head(8)}"


# --------------------------------------------------------------------------- small helpers
def first_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The first token of a reply text as it starts the assistant turn."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return int(ids[0])


def behavior_token_id(tokenizer: PreTrainedTokenizerBase, task: Any = "refusal") -> int:
    """First token of the behaviour's first target (or of its payload for code injection)."""
    from ...threat.attacks import resolve_task

    behavior = resolve_task(task)
    text = behavior.targets[0] if behavior.targets else behavior.payload
    return first_token_id(tokenizer, text.strip())


def block_spans(n_blocks: int, width: int | None = None, *, include_all: bool = True) -> list[range]:
    """Contiguous block spans: all blocks (optional), then consecutive spans of ``width``
    (default ``ceil(L / 3)``: start, middle, end)."""
    width = width or max(1, math.ceil(n_blocks / 3))
    spans = [range(0, n_blocks)] if include_all else []
    spans += [range(s, min(s + width, n_blocks)) for s in range(0, n_blocks, width)]
    return spans


def _span_blocks(span: Any, n_blocks: int) -> list[int]:
    if isinstance(span, str):
        if span != "all":
            raise ValueError(
                f"unknown span {span!r}; use 'all', an int, a range, (start, stop) or a list of blocks"
            )
        blocks = list(range(n_blocks))
    elif isinstance(span, int):
        blocks = [span]
    elif isinstance(span, tuple) and len(span) == 2 and all(isinstance(x, int) for x in span):
        blocks = list(range(span[0], span[1]))  # (start, stop), half-open like range()
    else:
        blocks = [int(b) for b in span]
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad or not blocks:
        raise ValueError(f"span {span!r}: blocks must be non-empty and in 0..{n_blocks - 1}")
    return sorted(set(blocks))


def _span_label(blocks: Sequence[int]) -> str:
    bs = sorted(blocks)
    if bs == list(range(bs[0], bs[-1] + 1)):
        return f"{bs[0]}" if len(bs) == 1 else f"{bs[0]}-{bs[-1]}"
    return ",".join(map(str, bs))


def _check_sites(sites: Iterable[str], allow_combo: bool = False) -> list[str]:
    out = []
    for s in [sites] if isinstance(sites, str) else list(sites):
        parts = s.split("+") if allow_combo else [s]
        for p in parts:
            if p not in SITES:
                hint = " (combine with '+')" if allow_combo else ""
                raise ValueError(f"unknown site {p!r}; sites: {list(SITES)}{hint}")
        out.append(s)
    if not out:
        raise ValueError("no sites given")
    return out


def _ordered(pairs: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """(block, site) pairs in execution order (nnsight serves values in the order the model runs)."""
    return sorted(set(pairs), key=lambda bs: (bs[0], SITES.index(bs[1])))


def _token_ids(token_id: int | Sequence[int]) -> list[int]:
    scalar = isinstance(token_id, numbers.Integral) or (torch.is_tensor(token_id) and token_id.ndim == 0)
    ids = [int(token_id)] if scalar else [int(t) for t in token_id]
    if not ids:
        raise ValueError("no token id given")
    return ids


def _as_prompts(prompts: Sequence[Example | str], what: str) -> list[Example | str]:
    out = list(prompts)
    if not out:
        raise ValueError(f"{what}: no prompts")
    return out


# --------------------------------------------------------------------------- batches
@dataclass
class _Batch:
    ids: torch.Tensor  # [B, W], left-padded
    mask: torch.Tensor
    pos: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def kwargs(self) -> dict[str, Any]:
        return {
            "input_ids": self.ids,
            "attention_mask": self.mask,
            "position_ids": self.pos,
            "logits_to_keep": 1,
        }


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Example | str]) -> list[list[int]]:
    """Token ids of each prompt, rendered through the chat template (no extra special tokens)."""
    return [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> _Batch:
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty prompt")
    ids, mask = left_pad(seqs, pad_id, width)
    pos = pad_positions(mask)
    return _Batch(ids, mask, pos)


def _chunks(n: int, size: int) -> list[range]:
    size = max(1, int(size))
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


# --------------------------------------------------------------------------- the nnsight wrapper
def nnsight_model(model: Model, tokenizer: PreTrainedTokenizerBase) -> Any:
    """Wrap an already-loaded HF model (or a PeftModel, through its inner causal LM) with nnsight.

    Returns a ``nnsight.TransformersModel`` over the *same* module object.
    nnsight installs an inert controller ``forward`` on each module the first
    time a model is wrapped (kept for the life of the module) and sets the
    tokenizer's ``padding_side`` to ``"left"``; the latter is restored here.
    An nnsight wrapper is returned unchanged.

    A module whose controller was replaced since an earlier wrap (something assigned its ``forward``)
    would run with its interventions disabled: it is re-instrumented around its current ``forward``
    first, and a module still without a working controller after wrapping raises ``RuntimeError``
    naming it. Probes never run with interventions silently off.
    """
    from nnsight import TransformersModel
    from nnsight.intervention.envoy import Envoy

    if isinstance(model, Envoy):
        check_instrumented(model._module)
        return model
    if tokenizer is None:
        raise ValueError("nnsight_model needs the tokenizer (otherwise the pipeline would try to load one)")
    hf = unwrap(model)
    reinstrument(hf)
    side = getattr(tokenizer, "padding_side", None)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            wrapped = TransformersModel(hf, tokenizer=tokenizer)
    finally:
        if side is not None:
            tokenizer.padding_side = side
    for w in seen:
        if "disables its interventions" in str(w.message):
            raise RuntimeError(f"nnsight: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    check_instrumented(hf)
    return wrapped


def _uninstrumented(hf: Any) -> list[str]:
    """Modules nnsight instrumented whose ``forward`` is no longer its controller (interventions off)."""
    from nnsight.intervention import source as src

    bad = []
    for name, m in hf.named_modules():
        d = m.__dict__
        if (
            src.STATE in d
            and not isinstance(d.get("forward"), src.Controller)
            and not src._framework_forward(m)
        ):
            bad.append(name or type(m).__name__)
    return bad


def reinstrument(hf: Any) -> list[str]:
    """Drop nnsight's state on modules whose controller was replaced, so the next wrap installs a fresh
    controller around their current ``forward``; returns their names."""
    from nnsight.intervention import source as src

    bad = _uninstrumented(hf)
    names = set(bad)
    for name, m in hf.named_modules():
        if (name or type(m).__name__) in names:
            m.__dict__.pop(src.STATE, None)
    return bad


def check_instrumented(hf: Any) -> None:
    """Raise ``RuntimeError`` naming the modules whose nnsight interventions are disabled, if any."""
    bad = _uninstrumented(hf)
    if bad:
        raise RuntimeError(
            f"nnsight: `forward` of {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} was replaced after "
            "wrapping, which disables its interventions; re-wrap the model with nnsight_model"
        )


def _hf_of(model: Any) -> Any:
    from nnsight.intervention.envoy import Envoy

    return model._module if isinstance(model, Envoy) else unwrap(model)


def _read(envoy: Any, site: str) -> torch.Tensor:
    """The live tensor of ``site`` (inside a trace): first element of tuple outputs."""
    value = envoy.input if site == "mlp_hidden" else envoy.output
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


class _Runner:
    """One probe call: the wrapped model, its layout, eval mode + no_grad, envoys by site."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, max_rows: int = 256) -> None:
        self.hf = _hf_of(model)
        self.tok = tokenizer
        self.w = nnsight_model(model, tokenizer)
        self.layout: Layout = layout_of(self.hf)
        self.L = self.layout.n_blocks
        self.batch_size = int(batch_size)
        self.max_rows = int(max_rows)
        pad = pad_token(tokenizer)
        self.pad_id = int(pad)
        self._envoys: dict[tuple[int, str], Any] = {}

    def __enter__(self) -> _Runner:
        self._was = self.hf.training
        self.hf.train(False)
        self._grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.set_grad_enabled(self._grad)
        self.hf.train(self._was)

    def envoy(self, block: int, site: str) -> Any:
        key = (block, site)
        if key not in self._envoys:
            path = self.layout.site_name(block, "mlp_hidden" if site == "mlp_hidden" else site)
            env = self.w
            for part in path.split("."):
                env = env[int(part)] if part.isdigit() else getattr(env, part)
            self._envoys[key] = env
        return self._envoys[key]

    # -- reading ---------------------------------------------------------------
    def collect_last(self, batch: _Batch, sites: Sequence[str], *, cache: bool = False) -> dict[str, Any]:
        """One trace: every site's value at the last position ([B, L, H] per site, fp32 on CPU),
        the last position's logits [B, V]; with ``cache`` also the KV cache of the whole batch."""
        order = _ordered((b, s) for b in range(self.L) for s in sites)
        envs = [(b, s, self.envoy(b, s)) for b, s in order]
        store: dict[Any, Any] = {}
        kwargs = batch.kwargs()
        if cache:
            kwargs["use_cache"] = True
        with self.w.trace(**kwargs):
            for b, s, env in envs:
                store[(b, s)] = _read(env, s)[:, -1].detach().float().cpu().clone().save()
            out = self.w.output
            store["logits"] = out.logits[:, -1].detach().float().cpu().clone().save()
            if cache:
                store["cache"] = out.past_key_values
        res = {s: torch.stack([store[(b, s)] for b in range(self.L)], 1) for s in sites}
        res["logits"] = store["logits"]
        if cache:
            res["cache"] = store["cache"]
        return res

    def site_means(
        self, seqs: Sequence[Sequence[int]], pairs: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], torch.Tensor]:
        """Mean of each (block, site) over all real (non-padding) tokens of ``seqs``."""
        order = _ordered(pairs)
        sums: dict[tuple[int, str], torch.Tensor] = {}
        count = 0
        for idx in _chunks(len(seqs), self.batch_size):
            batch = _left_pad([seqs[i] for i in idx], self.pad_id)
            m = batch.mask.to(self._device())[..., None].float()
            store: dict[Any, Any] = {}
            envs = [(b, s, self.envoy(b, s)) for b, s in order]
            with self.w.trace(**batch.kwargs()):
                for b, s, env in envs:
                    store[(b, s)] = (_read(env, s).float() * m).sum((0, 1)).cpu().save()
            for key in order:
                sums[key] = sums[key] + store[key] if key in sums else store[key]
            count += int(batch.mask.sum())
        return {k: v / count for k, v in sums.items()}

    def _device(self) -> torch.device:
        return next(self.hf.parameters()).device

    # -- editing ---------------------------------------------------------------
    def run_conditions(
        self, batch: _Batch, conditions: Sequence[Sequence[tuple[int, str, Callable]]]
    ) -> list[torch.Tensor]:
        """Last-position logits [B, V] for each condition; a condition is a list of
        ``(block, site, edit)`` with ``edit(live_tensor)`` changing it in place.
        Several conditions share one trace as nnsight invokes (at most ``max_rows`` rows)."""
        per_trace = max(1, self.max_rows // max(1, batch.size))
        results: list[torch.Tensor] = []
        for group in _chunks(len(conditions), per_trace):
            store: dict[Any, Any] = {}
            plans = []
            for c in group:
                edits = sorted(conditions[c], key=lambda e: (e[0], SITES.index(e[1])))
                plans.append((c, [(self.envoy(b, s), s, fn) for b, s, fn in edits]))
            kwargs = batch.kwargs()
            with self.w.trace() as tracer:
                for c, plan in plans:
                    with tracer.invoke(**kwargs):
                        for env, s, fn in plan:
                            fn(_read(env, s))
                        store[c] = self.w.output.logits[:, -1].detach().float().cpu().clone().save()
            results.extend(store[c] for c in group)
        return results


def _softmax_prob(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    return torch.softmax(logits.float(), -1)[:, list(ids)].sum(-1)


def _logit_metric(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """log-sum-exp of the behaviour ids' logits (the logit itself for one id)."""
    return torch.logsumexp(logits.float()[:, list(ids)], -1)
