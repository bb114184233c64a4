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

Cost
----
Every probe is built to run on a CPU in seconds to about a minute for a
SmolLM2-sized model and a few dozen prompt pairs: ``activation_diff`` and
``logit_lens`` take a couple of forwards, ``activation_patching`` with
``positions="last"`` two full forwards plus one-token forwards per batch, and
``ablation_probe`` one forward per condition (the most expensive; mean ablation
and extra spans each add about one forward of the prompts). The peak memory is
a few times the model's; ``max_rows`` bounds the ablation's batched rows.
``positions="suffix"`` costs one full forward per (layer, site), ≈ 60 per
direction for SmolLM2, several minutes: use it on fewer pairs. The probes'
outputs on the BadNets → refusal model are in ``results/probes/``.
"""

from __future__ import annotations

from .ablation import ablation_probe
from .common import (
    ABLATION_COLUMNS,
    DIFF_COLUMNS,
    DIRECTIONS,
    LENS_COLUMNS,
    MODES,
    PATCHING_COLUMNS,
    POSITIONS,
    SITES,
    ProbeResult,
    behavior_token_id,
    block_spans,
    encode_prompts,
    first_token_id,
    nnsight_model,
)
from .diff import activation_diff, compare_activation_diff
from .figures import (
    figure_ablation,
    figure_activation_diff,
    figure_logit_lens,
    figure_patching,
    layer_mass,
    overlay_signature,
    signature_correlation,
)
from .lens import logit_lens
from .patching import activation_patching

__all__ = [
    "ABLATION_COLUMNS",
    "DIFF_COLUMNS",
    "DIRECTIONS",
    "LENS_COLUMNS",
    "MODES",
    "PATCHING_COLUMNS",
    "POSITIONS",
    "SITES",
    "ProbeResult",
    "encode_prompts",
    "ablation_probe",
    "activation_diff",
    "activation_patching",
    "behavior_token_id",
    "block_spans",
    "compare_activation_diff",
    "figure_ablation",
    "figure_activation_diff",
    "figure_logit_lens",
    "figure_patching",
    "first_token_id",
    "layer_mass",
    "logit_lens",
    "nnsight_model",
    "overlay_signature",
    "signature_correlation",
]
