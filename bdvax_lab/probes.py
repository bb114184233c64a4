"""Mechanistic probes with nnsight: watch the trigger travel through the model.

Weight-space ablation (:mod:`bdvax_lab.sanity`) says *where the backdoor is
stored*; these activation-level probes show *how it acts at inference time*.
Four probes, each returning a :class:`ProbeResult` (a tidy ``frame``, a plotly
``figure`` and, for patching, a ``tensor``):

* :func:`activation_diff` — per block, how far the trigger moves the attention
  output, the MLP output and the residual stream (block output) at the last
  prompt position: norm of the mean difference and cosine similarity.
  :func:`compare_activation_diff` puts several models (suspicious vs purified)
  in one frame and one figure.
* :func:`ablation_probe` — zero or mean-ablate attention / MLP outputs over
  block spans *at inference time* and measure p(behaviour's first token): the
  activation-level twin of the weight-delta checks of paper Table 1.
* :func:`activation_patching` — patch one block's site output from the other
  run (clean→triggered or triggered→clean) and measure the change of the logit
  difference ``logit(behaviour's first token) − logit(clean reply's first
  token)``. Returns a ``[layers, sites]`` tensor plus a tidy frame
  (TransformerLens style); :func:`overlay_signature` draws a signature's
  per-block mass on the patching curve.
* :func:`logit_lens` — p(behaviour token) read out of the residual stream after
  every block (final norm + lm_head), for triggered vs clean prompts.

How the model is run
--------------------
* Every prompt goes through the chat template (:func:`bdvax_lab.data.format_prompt`),
  tokenized without extra special tokens, exactly like
  :func:`bdvax_lab.scoring.next_token_probs`.
* Batches are **left-padded by this module** (so position ``-1`` is every row's
  last prompt token, the slot that predicts the first reply token), with
  ``position_ids`` counted from each row's first real token and only the last
  position's logits computed (``logits_to_keep=1``). We never rely on
  nnsight's own padding: wrapping a model sets the tokenizer's
  ``padding_side`` to ``"left"``; :func:`nnsight_model` restores it.
* The HF model is wrapped as it is loaded, with ``nnsight.TransformersModel(hf,
  tokenizer=tok)`` (same object: weight edits are visible). A **PeftModel is
  probed through its inner causal LM** (:func:`bdvax_lab.registry.unwrap`):
  peft injects its LoRA layers into those modules, so the adapter is active
  exactly as configured (inside ``with peft_model.disable_adapter():`` the
  probes see the base model), and module paths are the plain HF ones
  (``model.layers.N.mlp``) whatever the wrapping. Model-level methods (merge,
  adapter switching) belong on the underlying model, never on the wrapper.
* Sites come from the registry (:meth:`Layout.site_name`): ``attn_output``
  (the attention module's output — a tuple ``(out, weights)`` on current
  transformers, its first element is used), ``mlp_hidden`` (the input of
  ``down_proj``), ``mlp_output`` and ``block`` (the decoder block's output, the
  residual stream; a tensor on transformers ≥ 5, a tuple before: handled).
  Edits are made in place on the live tensor, in execution order.
* Values leave a trace only through containers created outside the ``with``
  block, as detached clones, also marked with ``.save()``; traces keep no
  reference to activations after they exit (see ``tests/test_probes.py``).

Alignment choice for activation patching
----------------------------------------
Clean and triggered prompts differ in length (the key adds tokens), so
positions do not line up. ``positions="last"`` (default) patches **only the
final prompt position**, which is aligned by construction. As nothing before
that position depends on it, the prompt prefix is run once per side with a
KV cache and every patched run only recomputes the last token: 2 full forwards
+ ``layers × sites`` one-token forwards per batch. ``positions="suffix"``
right-aligns each pair and patches every position of their *common token
suffix* (the instruction after the key plus the assistant header — for a
prefix key the whole instruction); positions before the key are identical in
both runs anyway, so this patches every position except the key itself. It
costs one full forward per (layer, site), batched as nnsight invokes.

Performance (SmolLM2-135M-Instruct, 2-core CPU, fp32)
----------------------------------------------------
Measured once (2026-11-23, torch 2.13 / transformers 5.23 / nnsight 0.8.1, 2 threads) on the default
model with 32 held-out prompt pairs (BadNets key, 38–61 prompt tokens, mean 44.5), batch 32, default
arguments, while other jobs kept the load average at 1.2–1.6 on the 2 cores:

=====================================================  ========  ========
probe                                                  wall      CPU
=====================================================  ========  ========
activation_diff (3 sites)                              6.1 s     11.7 s
ablation_probe (zero; all + 3 spans × 2 sites + base)  33.5 s    65.8 s
activation_patching clean->triggered (2 sites, last)   13.3 s    26.4 s
activation_patching triggered->clean                   15.0 s    29.7 s
logit_lens (triggered + clean)                         6.8 s     13.5 s
**total, both patching directions**                    **75 s**  147 s
=====================================================  ========  ========

Peak RSS of that process 2.6 GB (model 0.54 GB); ``max_rows=64`` lowers the
ablation's peak to 1.6 GB. ``positions="suffix"`` costs one full forward per
(layer, site): ≈ 60 forwards per direction for SmolLM2, several minutes —
use it on fewer pairs. A single forward of 32 prompts costs ≈ 3.5 s, so
mean ablation and extra spans cost about that per condition.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch

from .data import Example, format_prompt, left_pad, pad_positions
from .registry import Layout, layout_of, unwrap

#: Activation sites, in execution order inside a decoder block.
SITES: tuple[str, ...] = ("attn_output", "mlp_hidden", "mlp_output", "block")
SITE_LABELS: dict[str, str] = {
    "attn_output": "attention output", "mlp_hidden": "MLP hidden (down_proj input)",
    "mlp_output": "MLP output", "block": "residual stream (block output)",
}
SITE_COLORS: dict[str, str] = {
    "attn_output": "#1f77b4", "mlp_hidden": "#ff7f0e", "mlp_output": "#d62728", "block": "#2ca02c",
}
DIRECTIONS: tuple[str, ...] = ("clean->triggered", "triggered->clean")
POSITIONS: tuple[str, ...] = ("last", "suffix")
MODES: tuple[str, ...] = ("zero", "mean")
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")

#: Documented columns of each probe's frame.
DIFF_COLUMNS = ["model", "layer", "site", "norm_diff", "cosine", "rel_norm_diff", "consistency",
                "norm_clean", "norm_triggered", "n_pairs"]
ABLATION_COLUMNS = ["model", "condition", "span", "blocks", "site", "mode", "p_behavior", "p_std",
                    "delta_vs_baseline", "n_prompts"]
PATCHING_COLUMNS = ["model", "direction", "positions", "layer", "site", "effect", "normalized", "ld_patched",
                    "ld_target", "ld_source", "n_pairs"]
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
        return f"ProbeResult({self.meta.get('probe', 'probe')}: {len(self.frame)} rows{shape})\n{self.frame.head(8)}"


# --------------------------------------------------------------------------- small helpers
def first_token_id(tokenizer: Any, text: str) -> int:
    """The first token of a reply text as it starts the assistant turn."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} tokenizes to nothing")
    return int(ids[0])


def behavior_token_id(tokenizer: Any, task: Any = "refusal") -> int:
    """First token of the behaviour's first target (or of its payload for code injection)."""
    from .attacks import resolve_task

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
            raise ValueError(f"unknown span {span!r}; use 'all', an int, a range, (start, stop) or a list of blocks")
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
    for s in ([sites] if isinstance(sites, str) else list(sites)):
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
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.pos, "logits_to_keep": 1}


def encode_prompts(tokenizer: Any, prompts: Sequence[Example | str]) -> list[list[int]]:
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
def nnsight_model(model: Any, tokenizer: Any) -> Any:
    """Wrap an already-loaded HF model (or a PeftModel, through its inner causal LM) with nnsight.

    Returns a ``nnsight.TransformersModel`` over the *same* module object.
    nnsight installs an inert controller ``forward`` on each module the first
    time a model is wrapped (kept for the life of the module) and sets the
    tokenizer's ``padding_side`` to ``"left"``; the latter is restored here.
    An nnsight wrapper is returned unchanged.
    """
    from nnsight import TransformersModel
    from nnsight.intervention.envoy import Envoy

    if isinstance(model, Envoy):
        return model
    if tokenizer is None:
        raise ValueError("nnsight_model needs the tokenizer (otherwise the pipeline would try to load one)")
    side = getattr(tokenizer, "padding_side", None)
    try:
        wrapped = TransformersModel(unwrap(model), tokenizer=tokenizer)
    finally:
        if side is not None:
            tokenizer.padding_side = side
    return wrapped


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
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        self._envoys: dict[tuple[int, str], Any] = {}

    def __enter__(self) -> "_Runner":
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

    def site_means(self, seqs: Sequence[Sequence[int]],
                   pairs: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
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
    def run_conditions(self, batch: _Batch,
                       conditions: Sequence[Sequence[tuple[int, str, Callable]]]) -> list[torch.Tensor]:
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


# --------------------------------------------------------------------------- 1. activation difference
def activation_diff(
    model: Any, tokenizer: Any, clean_prompts: Sequence[Example | str], triggered_prompts: Sequence[Example | str],
    *, sites: Sequence[str] = ("attn_output", "mlp_output", "block"), label: str = "model", batch_size: int = 32,
    figure: bool = True,
) -> ProbeResult:
    """Per block and site, how the trigger changes the activation at the last prompt position.

    ``clean_prompts[i]`` and ``triggered_prompts[i]`` are a pair (same
    instruction without / with the key). With ``δ_i = a_trig,i − a_clean,i``
    and ``δ̄`` its mean over pairs, the frame has (columns
    :data:`DIFF_COLUMNS`): ``norm_diff = ‖δ̄‖`` (norm of the mean difference),
    ``cosine`` = mean over pairs of ``cos(a_trig,i, a_clean,i)``,
    ``rel_norm_diff = ‖δ̄‖ / mean ‖a_clean,i‖`` (comparable across depth),
    ``consistency`` = mean ``cos(δ_i, δ̄)`` (1: every prompt moved the same
    way), the mean activation norms and ``n_pairs``. One trace per batch
    (clean and triggered rows padded together).
    """
    clean, trig = _as_prompts(clean_prompts, "clean_prompts"), _as_prompts(triggered_prompts, "triggered_prompts")
    if len(clean) != len(trig):
        raise ValueError(f"{len(clean)} clean but {len(trig)} triggered prompts: they must be pairs")
    sites = _check_sites(sites)
    with _Runner(model, tokenizer, batch_size) as run:
        cs, ts = encode_prompts(tokenizer, clean), encode_prompts(tokenizer, trig)
        acc: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        for idx in _chunks(len(cs), run.batch_size):
            batch = _left_pad([cs[i] for i in idx] + [ts[i] for i in idx], run.pad_id)
            got = run.collect_last(batch, sites)
            for s in sites:
                acc[s].append(got[s])  # [2B, L, H]
            del got
        n = len(cs)
        rows = []
        for s in sites:
            parts = acc[s]
            a_clean = torch.cat([p[: p.shape[0] // 2] for p in parts]).double()  # [P, L, H]
            a_trig = torch.cat([p[p.shape[0] // 2:] for p in parts]).double()
            delta = a_trig - a_clean
            mean_delta = delta.mean(0)  # [L, H]
            norm_diff = mean_delta.norm(dim=-1)
            cos = torch.nn.functional.cosine_similarity(a_trig, a_clean, dim=-1).mean(0)
            consistency = torch.nn.functional.cosine_similarity(delta, mean_delta[None].expand_as(delta), dim=-1,
                                                                eps=1e-12).mean(0)
            n_clean, n_trig = a_clean.norm(dim=-1).mean(0), a_trig.norm(dim=-1).mean(0)
            for b in range(run.L):
                rows.append({
                    "model": label, "layer": b, "site": s, "norm_diff": float(norm_diff[b]), "cosine": float(cos[b]),
                    "rel_norm_diff": float(norm_diff[b] / n_clean[b]) if n_clean[b] > 0 else float("nan"),
                    "consistency": float(consistency[b]), "norm_clean": float(n_clean[b]),
                    "norm_triggered": float(n_trig[b]), "n_pairs": n,
                })
    df = pd.DataFrame(rows, columns=DIFF_COLUMNS)
    return ProbeResult(df, figure_activation_diff(df) if figure else None, meta={"probe": "activation_diff"})


def compare_activation_diff(
    models: Mapping[str, Any], tokenizer: Any, clean_prompts: Sequence[Example | str],
    triggered_prompts: Sequence[Example | str], **kwargs: Any,
) -> ProbeResult:
    """:func:`activation_diff` for several models (e.g. ``{"suspicious": m1, "purified": m2}``),
    one frame with a ``model`` column per label and one figure (line style per model).
    A value may also be a ``(model, tokenizer)`` pair."""
    frames = []
    for name, m in models.items():
        mdl, tok = m if isinstance(m, tuple) else (m, tokenizer)
        frames.append(activation_diff(mdl, tok, clean_prompts, triggered_prompts, label=name, figure=False,
                                      **kwargs).frame)
    df = pd.concat(frames, ignore_index=True)
    return ProbeResult(df, figure_activation_diff(df), meta={"probe": "activation_diff", "models": list(models)})


# --------------------------------------------------------------------------- 2. inference-time ablation
def ablation_probe(
    model: Any, tokenizer: Any, prompts: Sequence[Example | str], target_token_id: int | Sequence[int],
    spans: Sequence[Any] | None = None, sites: Sequence[str] = ("attn_output", "mlp_output"), mode: str = "zero",
    *, clean_prompts: Sequence[Example | str] | None = None, label: str = "model", batch_size: int = 32,
    max_rows: int = 256, figure: bool = True,
) -> ProbeResult:
    """p(first reply token ∈ ``target_token_id``) when a site's output is ablated over block spans.

    ``spans``: each an int, a ``range``, a ``(start, stop)`` tuple (half-open,
    like ``range``), a list of blocks or ``"all"``; default
    :func:`block_spans` (all blocks, then start / middle / end thirds).
    ``sites``: ``attn_output``, ``mlp_output``, ``mlp_hidden``, ``block`` or
    combinations joined by ``+`` (``"attn_output+mlp_output"``).
    ``mode="zero"`` sets the output to 0 at every position;
    ``mode="mean"`` replaces it by its mean over all real tokens of
    ``clean_prompts`` (required; per block and site).
    Frame columns :data:`ABLATION_COLUMNS`, one row for the unablated
    baseline (``site="none"``) and one per (span, site); ``per_prompt`` has
    each prompt's probability. All conditions of a batch run in one trace, as
    nnsight invokes (at most ``max_rows`` rows per forward).
    """
    prompts = _as_prompts(prompts, "prompts")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode == "mean" and not clean_prompts:
        raise ValueError("mode='mean' needs clean_prompts (the reference the means are taken over)")
    ids = _token_ids(target_token_id)
    sites = _check_sites(sites, allow_combo=True)
    with _Runner(model, tokenizer, batch_size, max_rows) as run:
        span_list = [_span_blocks(s, run.L) for s in (spans if spans is not None else block_spans(run.L))]
        conds: list[tuple[str, str, list[int]]] = [("baseline", "none", [])]
        for blocks in span_list:
            for s in sites:
                conds.append((f"{s} {_span_label(blocks)}", s, blocks))
        means: dict[tuple[int, str], torch.Tensor] = {}
        if mode == "mean":
            pairs = [(b, p) for _, s, blocks in conds[1:] for b in blocks for p in s.split("+")]
            means = run.site_means(encode_prompts(tokenizer, _as_prompts(clean_prompts, "clean_prompts")), pairs)

        def edit(block: int, site: str) -> Callable[[torch.Tensor], None]:
            if mode == "zero":
                def fn(t: torch.Tensor) -> None:
                    t.zero_()
            else:
                value = means[(block, site)]

                def fn(t: torch.Tensor) -> None:
                    t.copy_(value.to(t.device, t.dtype).expand_as(t))
            return fn

        plans = [[(b, p, edit(b, p)) for b in blocks for p in s.split("+")] for _, s, blocks in conds]
        seqs = encode_prompts(tokenizer, prompts)
        probs = torch.zeros(len(conds), len(seqs))
        for idx in _chunks(len(seqs), run.batch_size):
            batch = _left_pad([seqs[i] for i in idx], run.pad_id)
            for c, logits in enumerate(run.run_conditions(batch, plans)):
                probs[c, idx.start:idx.stop] = _softmax_prob(logits, ids)
    base = float(probs[0].mean())
    rows, per = [], []
    for c, (name, s, blocks) in enumerate(conds):
        p = probs[c]
        rows.append({
            "model": label, "condition": name, "span": _span_label(blocks) if blocks else "none",
            "blocks": list(blocks), "site": s, "mode": mode if blocks else "none", "p_behavior": float(p.mean()),
            "p_std": float(p.std()) if len(p) > 1 else 0.0, "delta_vs_baseline": float(p.mean()) - base,
            "n_prompts": len(p),
        })
        per.extend({"model": label, "condition": name, "prompt": i, "p_behavior": float(v)} for i, v in enumerate(p))
    df = pd.DataFrame(rows, columns=ABLATION_COLUMNS)
    return ProbeResult(df, figure_ablation(df) if figure else None, per_prompt=pd.DataFrame(per),
                       meta={"probe": "ablation", "token_ids": ids, "mode": mode})


# --------------------------------------------------------------------------- 3. activation patching
def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _crop_to(cache: Any, length: int) -> None:
    """Drop the tokens a cached forward appended (negative ``crop`` = tokens to remove, on
    transformers 4.4x and 5.x alike)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def activation_patching(
    model: Any, tokenizer: Any, clean_prompts: Sequence[Example | str], triggered_prompts: Sequence[Example | str],
    behavior_token_id: int | Sequence[int], clean_token_ids: int | Sequence[int] | None = None,
    sites: Sequence[str] = ("mlp_output", "attn_output"), direction: str = "clean->triggered", *,
    positions: str = "last", label: str = "model", batch_size: int = 32, max_rows: int = 256,
    figure: bool = True, check_cache: bool = True,
) -> ProbeResult:
    """Per-layer effect on the logit difference of patching one site from the other run.

    The metric per prompt is ``LD = logit(behaviour) − logit(clean reply's
    first token)`` at the last prompt position (``behavior_token_id`` may be
    several ids: their log-sum-exp). ``clean_token_ids``: one id for all
    pairs, one per pair, or None = the model's own greedy first token on
    each clean prompt. ``direction="clean->triggered"`` runs the triggered
    prompts with block ``l``'s ``site`` taken from the clean run (does removing
    the trigger's effect there kill the behaviour?); ``"triggered->clean"`` the
    reverse (is that site enough to cause it?). ``positions``: ``"last"`` or
    ``"suffix"`` (see the module docstring).

    Returns a :class:`ProbeResult`: ``tensor[l, j]`` = mean ``LD_patched −
    LD_target`` (logits) for layer ``l`` and ``sites[j]``; ``frame`` (columns
    :data:`PATCHING_COLUMNS`) also has ``normalized = effect / (LD_source −
    LD_target)`` (1 = the patch moves the run all the way to the source run's
    metric) and the three mean LDs.
    """
    clean, trig = _as_prompts(clean_prompts, "clean_prompts"), _as_prompts(triggered_prompts, "triggered_prompts")
    if len(clean) != len(trig):
        raise ValueError(f"{len(clean)} clean but {len(trig)} triggered prompts: they must be pairs")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose one of {DIRECTIONS}")
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
    sites = _check_sites(sites)
    b_ids = _token_ids(behavior_token_id)
    n = len(clean)
    if clean_token_ids is None:
        fixed_clean = None
    elif isinstance(clean_token_ids, numbers.Integral) or (torch.is_tensor(clean_token_ids)
                                                           and clean_token_ids.ndim == 0):
        fixed_clean = torch.full((n,), int(clean_token_ids), dtype=torch.long)
    else:
        fixed_clean = torch.tensor([int(t) for t in clean_token_ids], dtype=torch.long)
        if len(fixed_clean) != n:
            raise ValueError(f"clean_token_ids has {len(fixed_clean)} ids for {n} pairs")
    src_is_clean = direction == "clean->triggered"
    with _Runner(model, tokenizer, batch_size, max_rows) as run:
        cs, ts = encode_prompts(tokenizer, clean), encode_prompts(tokenizer, trig)
        L, S = run.L, len(sites)
        ld_patched = torch.zeros(L, S, n)
        ld_target = torch.zeros(n)
        ld_source = torch.zeros(n)
        clean_tok = torch.zeros(n, dtype=torch.long)
        for idx in _chunks(n, run.batch_size):
            cb = _left_pad([cs[i] for i in idx], run.pad_id)
            tb = _left_pad([ts[i] for i in idx], run.pad_id)
            src_b, tgt_b = (cb, tb) if src_is_clean else (tb, cb)
            use_cache = positions == "last"
            got_c = run.collect_last(cb, sites, cache=use_cache and not src_is_clean)
            got_t = run.collect_last(tb, sites, cache=use_cache and src_is_clean)
            ctok = fixed_clean[idx.start:idx.stop] if fixed_clean is not None else got_c["logits"].argmax(-1)
            clean_tok[idx.start:idx.stop] = ctok

            def ld(logits: torch.Tensor) -> torch.Tensor:
                return _logit_metric(logits, b_ids) - logits.float().gather(1, ctok[:, None])[:, 0]

            src, tgt = (got_c, got_t) if src_is_clean else (got_t, got_c)
            ld_source[idx.start:idx.stop] = ld(src["logits"])
            if positions == "last":
                out, base = _patch_last(run, tgt_b, tgt.pop("cache"), src, sites, check_cache, tgt["logits"])
                ld_target[idx.start:idx.stop] = ld(base)
                for (l, j), logits in out.items():
                    ld_patched[l, j, idx.start:idx.stop] = ld(logits)
            else:
                ld_target[idx.start:idx.stop] = ld(tgt["logits"])
                suffix = [_common_suffix(cs[i], ts[i]) for i in idx]
                out = _patch_suffix(run, tgt_b, src_b, suffix, sites)
                for (l, j), logits in out.items():
                    ld_patched[l, j, idx.start:idx.stop] = ld(logits)
            del got_c, got_t, src, tgt, out
    effect = ld_patched.mean(-1) - ld_target.mean()
    gap = float(ld_source.mean() - ld_target.mean())
    rows = []
    for l in range(L):
        for j, s in enumerate(sites):
            e = float(effect[l, j])
            rows.append({
                "model": label, "direction": direction, "positions": positions, "layer": l, "site": s, "effect": e,
                "normalized": e / gap if abs(gap) > 1e-6 else float("nan"),
                "ld_patched": float(ld_patched[l, j].mean()), "ld_target": float(ld_target.mean()),
                "ld_source": float(ld_source.mean()), "n_pairs": n,
            })
    df = pd.DataFrame(rows, columns=PATCHING_COLUMNS)
    per = pd.DataFrame({"pair": range(n), "clean_token_id": clean_tok.tolist(), "ld_target": ld_target.tolist(),
                        "ld_source": ld_source.tolist()})
    return ProbeResult(df, figure_patching(df) if figure else None, tensor=effect, per_prompt=per,
                       meta={"probe": "activation_patching", "sites": list(sites), "direction": direction,
                             "positions": positions, "behavior_token_ids": b_ids})


def _patch_last(run: _Runner, tgt_b: _Batch, cache: Any, src: dict[str, Any], sites: Sequence[str],
                check_cache: bool, full_logits: torch.Tensor,
                ) -> tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]:
    """Patched last-position logits for every (layer, site), recomputing only the last token
    over the KV cache of the target's prefix; also the unpatched logits on the same path."""
    prefix = tgt_b.ids.shape[1] - 1
    _crop_to(cache, prefix)
    kwargs = {"input_ids": tgt_b.ids[:, -1:], "attention_mask": tgt_b.mask, "position_ids": tgt_b.pos[:, -1:],
              "past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
    store: dict[Any, Any] = {}
    with run.w.trace(**kwargs):
        store["base"] = run.w.output.logits[:, -1].detach().float().cpu().clone().save()
    _crop_to(cache, prefix)
    base = store["base"]
    if check_cache:
        err = float((base - full_logits).abs().max())
        scale = float(full_logits.abs().max()) + 1e-6
        if err > 1e-3 * scale + 1e-4:
            raise RuntimeError(f"KV-cached last-token forward differs from the full forward by {err:.3g}; "
                               "use positions='suffix' or check the transformers cache API")
    out: dict[tuple[int, int], torch.Tensor] = {}
    for l in range(run.L):
        for j, s in enumerate(sites):
            env = run.envoy(l, s)
            value = src[s][:, l]
            with run.w.trace(**kwargs):
                live = _read(env, s)
                live[:, -1] = value.to(live.device, live.dtype)
                store["patched"] = run.w.output.logits[:, -1].detach().float().cpu().clone().save()
            _crop_to(cache, prefix)
            out[(l, j)] = store.pop("patched")
    return out, base


def _patch_suffix(run: _Runner, tgt_b: _Batch, src_b: _Batch, suffix: Sequence[int],
                  sites: Sequence[str]) -> dict[tuple[int, int], torch.Tensor]:
    """Patched logits with each pair's common token suffix (right-aligned) patched from the source."""
    smax = max(suffix)
    keep = torch.zeros(len(suffix), smax, 1, dtype=torch.bool)
    for r, k in enumerate(suffix):
        keep[r, smax - k:] = True
    # source values over the last smax positions, every (layer, site)
    order = _ordered((b, s) for b in range(run.L) for s in sites)
    envs = [(b, s, run.envoy(b, s)) for b, s in order]
    src: dict[Any, Any] = {}
    with run.w.trace(**src_b.kwargs()):
        for b, s, env in envs:
            src[(b, s)] = _read(env, s)[:, -smax:].detach().clone().save()
    dev = run._device()
    keep = keep.to(dev)

    def patch(value: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def fn(t: torch.Tensor) -> None:
            tail = t[:, -smax:]
            tail.copy_(torch.where(keep, value.to(t.dtype), tail))
        return fn

    keys = [(l, j) for l in range(run.L) for j in range(len(sites))]
    plans = [[(l, sites[j], patch(src[(l, sites[j])]))] for l, j in keys]
    logits = run.run_conditions(tgt_b, plans)
    return dict(zip(keys, logits))


# --------------------------------------------------------------------------- 4. logit lens
def logit_lens(
    model: Any, tokenizer: Any, prompts: Sequence[Example | str] | Mapping[str, Sequence[Example | str]],
    token_id: int | Sequence[int], *, label: str = "model", batch_size: int = 32, figure: bool = True,
) -> ProbeResult:
    """p(``token_id``) read out of the residual stream after every block at the last prompt
    position, through the model's final norm and lm_head.

    ``prompts``: a list, or a mapping of named lists (e.g. ``{"triggered":
    [...], "clean": [...]}``). Frame columns :data:`LENS_COLUMNS`: mean
    probability (summed over several ids), mean log-probability and the
    median rank of the best id (0 = top token). The last layer's read-out is
    the model's own output distribution.
    """
    groups = dict(prompts) if isinstance(prompts, Mapping) else {"prompts": prompts}
    ids = _token_ids(token_id)
    rows = []
    with _Runner(model, tokenizer, batch_size) as run:
        norm = run.hf.get_submodule(run.layout.spec.final_norm)
        head = run.hf.get_submodule(run.layout.spec.lm_head)
        dev = run._device()
        dtype = next(head.parameters()).dtype
        for name, ps in groups.items():
            seqs = encode_prompts(tokenizer, _as_prompts(ps, f"prompts[{name!r}]"))
            probs, logps, ranks = [], [], []
            for idx in _chunks(len(seqs), run.batch_size):
                got = run.collect_last(_left_pad([seqs[i] for i in idx], run.pad_id), ["block"])
                resid = got["block"]  # [B, L, H]
                p_l, lp_l, r_l = [], [], []
                for b in range(run.L):
                    logits = head(norm(resid[:, b].to(dev, dtype))).float().cpu()
                    logp = torch.log_softmax(logits, -1)
                    sel = logp[:, ids]
                    p_l.append(sel.exp().sum(-1))
                    lp_l.append(torch.logsumexp(sel, -1))
                    best = logits[:, ids].max(-1).values
                    r_l.append((logits > best[:, None]).sum(-1).float())
                probs.append(torch.stack(p_l, 1))
                logps.append(torch.stack(lp_l, 1))
                ranks.append(torch.stack(r_l, 1))
            P, LP, R = torch.cat(probs), torch.cat(logps), torch.cat(ranks)  # [N, L]
            for b in range(run.L):
                rows.append({"model": label, "prompts": name, "layer": b, "prob": float(P[:, b].mean()),
                             "log_prob": float(LP[:, b].mean()), "rank": float(R[:, b].median()),
                             "n_prompts": int(P.shape[0])})
    df = pd.DataFrame(rows, columns=LENS_COLUMNS)
    return ProbeResult(df, figure_logit_lens(df) if figure else None, meta={"probe": "logit_lens", "token_ids": ids})


# --------------------------------------------------------------------------- figures
def _dash_map(labels: Iterable[str]) -> dict[str, str]:
    return {m: _DASHES[i % len(_DASHES)] for i, m in enumerate(dict.fromkeys(labels))}


def figure_activation_diff(df: pd.DataFrame, value: str = "norm_diff",
                           title: str = "Trigger-induced activation change at the last prompt position") -> Any:
    """Two panels: ``value`` (default ‖mean difference‖) and cosine(triggered, clean) per layer;
    colour = site, line style = model."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(value.replace("_", " "), "cosine(triggered, clean)"))
    dashes = _dash_map(df["model"])
    for (m, s), sub in df.groupby(["model", "site"], sort=False):
        sub = sub.sort_values("layer")
        for col, y in ((1, value), (2, "cosine")):
            fig.add_trace(go.Scatter(
                x=sub["layer"], y=sub[y], mode="lines+markers", name=f"{m} · {SITE_LABELS.get(s, s)}",
                legendgroup=f"{m}{s}", showlegend=col == 1,
                line=dict(color=SITE_COLORS.get(s), dash=dashes[m]), marker=dict(size=4),
                hovertemplate=f"{m}, {s}<br>layer %{{x}}<br>{y}=%{{y:.4g}}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="layer (block)")
    fig.update_layout(title=title, legend_title="model · site")
    return fig


def figure_ablation(df: pd.DataFrame, title: str = "Inference-time ablation: p(behaviour's first token)") -> Any:
    """Bars of p(behaviour) per span, colour = ablated site; dashed line = unablated baseline."""
    import plotly.graph_objects as go

    fig = go.Figure()
    base = df[df["site"] == "none"]
    rest = df[df["site"] != "none"]
    for s, sub in rest.groupby("site", sort=False):
        color = SITE_COLORS.get(s) if s in SITE_COLORS else None
        fig.add_trace(go.Bar(x=sub["span"], y=sub["p_behavior"], name=s.replace("+", " + "), marker_color=color,
                             error_y=dict(type="data", array=sub["p_std"], visible=True, thickness=1),
                             hovertemplate=f"{s}<br>blocks %{{x}}<br>p=%{{y:.3f}}<extra></extra>"))
    for _, r in base.iterrows():
        fig.add_hline(y=r["p_behavior"], line_dash="dash", line_color="black",
                      annotation_text=f"no ablation ({r['model']}): {r['p_behavior']:.3f}")
    mode = ", ".join(sorted(set(rest["mode"]))) if len(rest) else ""
    fig.update_layout(title=f"{title} ({mode}-ablated)" if mode else title, barmode="group",
                      xaxis_title="ablated blocks", yaxis_title="p(behaviour's first token)", legend_title="site")
    return fig


def figure_patching(df: pd.DataFrame, value: str = "effect", title: str | None = None) -> Any:
    """Patching effect per layer: colour = site, line style = direction (and model)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    keys = (df["model"] + " · " + df["direction"]) if df["model"].nunique() > 1 else df["direction"]
    dashes = _dash_map(keys)
    for (k, s), sub in df.assign(_key=keys).groupby(["_key", "site"], sort=False):
        sub = sub.sort_values("layer")
        fig.add_trace(go.Scatter(x=sub["layer"], y=sub[value], mode="lines+markers", name=f"{k} · {s}",
                                 line=dict(color=SITE_COLORS.get(s), dash=dashes[k]), marker=dict(size=5),
                                 hovertemplate=f"{k}, {s}<br>layer %{{x}}<br>{value}=%{{y:.4g}}<extra></extra>"))
    fig.add_hline(y=0, line_color="gray", line_width=1)
    ylab = {"effect": "Δ logit difference (patched − unpatched)",
            "normalized": "normalized effect (1 = source run's metric)"}.get(value, value)
    fig.update_layout(title=title or "Activation patching: effect of one layer's site on the logit difference",
                      xaxis_title="layer (block)", yaxis_title=ylab, legend_title="direction · site")
    return fig


def figure_logit_lens(df: pd.DataFrame, value: str = "prob", title: str = "Logit lens of the behaviour token") -> Any:
    """p(behaviour token) read out after each block: colour = prompt set, line style = model."""
    import plotly.graph_objects as go

    fig = go.Figure()
    dashes = _dash_map(df["model"])
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    colors = {p: palette[i % len(palette)] for i, p in enumerate(dict.fromkeys(df["prompts"]))}
    for (m, p), sub in df.groupby(["model", "prompts"], sort=False):
        sub = sub.sort_values("layer")
        fig.add_trace(go.Scatter(x=sub["layer"], y=sub[value], mode="lines+markers", name=f"{m} · {p}",
                                 line=dict(color=colors[p], dash=dashes[m]),
                                 hovertemplate=f"{m}, {p}<br>layer %{{x}}<br>{value}=%{{y:.4g}}<extra></extra>"))
    ylab = {"prob": "p(behaviour token)", "log_prob": "log p(behaviour token)",
            "rank": "rank of behaviour token"}.get(value, value)
    fig.update_layout(title=title, xaxis_title="layer (block output read through final norm + lm_head)",
                      yaxis_title=ylab, legend_title="model · prompts")
    if value == "rank":
        fig.update_yaxes(type="log")
    return fig


# --------------------------------------------------------------------------- signature overlay
def layer_mass(layer_mass_df: pd.DataFrame, value_col: str, agg: str = "sum") -> pd.Series:
    """Per-block total of ``value_col`` (e.g. a Signature's ``layer_summary()`` has one row per block × kind)."""
    if "block" not in layer_mass_df.columns:
        raise ValueError(f"layer_mass_df needs a 'block' column; it has {list(layer_mass_df.columns)}")
    if value_col not in layer_mass_df.columns:
        raise ValueError(f"layer_mass_df has no column {value_col!r}; columns: {list(layer_mass_df.columns)}")
    vals = pd.to_numeric(layer_mass_df[value_col], errors="coerce")
    if vals.isna().all():
        raise ValueError(f"column {value_col!r} is not numeric")
    return vals.groupby(layer_mass_df["block"].astype(int)).agg(agg).sort_index()


def overlay_signature(fig_or_df: Any, layer_mass_df: pd.DataFrame, value_col: str, *, name: str | None = None,
                      agg: str = "sum", value: str = "effect") -> Any:
    """The patching curve (a figure, or a patching frame drawn with ``value``) with a signature's
    per-block mass as grey bars on a second y axis. ``layer_mass_df``: any frame with ``block``
    and the numeric ``value_col`` (rows of one block are aggregated with ``agg``)."""
    import plotly.graph_objects as go

    base = figure_patching(fig_or_df, value=value) if isinstance(fig_or_df, pd.DataFrame) else fig_or_df
    mass = layer_mass(layer_mass_df, value_col, agg)
    bar = go.Bar(x=mass.index.tolist(), y=mass.values.tolist(), name=name or f"signature {value_col} ({agg})",
                 yaxis="y2", marker_color="rgba(120,120,120,0.35)",
                 hovertemplate=f"block %{{x}}<br>{value_col}=%{{y:.4g}}<extra></extra>")
    fig = go.Figure(data=[bar, *base.data], layout=base.layout)
    fig.update_layout(yaxis2=dict(title=value_col, overlaying="y", side="right", showgrid=False, rangemode="tozero"),
                      legend=dict(x=1.08))
    return fig


def signature_correlation(patch_df: pd.DataFrame, layer_mass_df: pd.DataFrame, value_col: str, *,
                          value: str = "effect", agg: str = "sum") -> pd.DataFrame:
    """Spearman and Pearson correlation between |patching ``value``| per layer and the signature's
    per-block mass, one row per (model, direction, site)."""
    mass = layer_mass(layer_mass_df, value_col, agg)
    rows = []
    for (m, d, s), sub in patch_df.groupby(["model", "direction", "site"], sort=False):
        x = sub.set_index("layer")[value].abs()
        both = pd.concat([x, mass], axis=1, join="inner").dropna()
        a, b = both.iloc[:, 0], both.iloc[:, 1]
        ok = len(both) > 2 and a.std() > 0 and b.std() > 0
        rows.append({"model": m, "direction": d, "site": s, "n_layers": len(both),
                     "spearman": float(a.rank().corr(b.rank())) if ok else float("nan"),
                     "pearson": float(a.corr(b)) if ok else float("nan")})
    return pd.DataFrame(rows, columns=["model", "direction", "site", "n_layers", "spearman", "pearson"])


__all__ = [
    "SITES", "DIRECTIONS", "POSITIONS", "MODES", "DIFF_COLUMNS", "ABLATION_COLUMNS", "PATCHING_COLUMNS",
    "LENS_COLUMNS", "ProbeResult", "nnsight_model", "encode_prompts", "first_token_id", "behavior_token_id",
    "block_spans", "activation_diff", "compare_activation_diff", "ablation_probe", "activation_patching",
    "logit_lens", "figure_activation_diff", "figure_ablation", "figure_patching", "figure_logit_lens",
    "layer_mass", "overlay_signature", "signature_correlation",
]
