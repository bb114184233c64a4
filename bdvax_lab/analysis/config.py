"""Sanity-check settings (torch-free).

Which checks exist, their default sweeps, how much each condition is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config

CHECKS: tuple[str, ...] = ("attention_vs_mlp", "span_sweep", "keep_only_spans", "shuffle_blocks")


#: The paper's Table 1 (LLaMA-2-7B-Chat, 32 blocks), one observation per check.
PAPER_TABLE1: dict[str, str] = {
    "attention_vs_mlp": (
        "attention ablation (keep MLP ΔW): backdoor persists; "
        "MLP ablation (keep attention ΔW): backdoor eliminated"
    ),
    "span_sweep": (
        "zeroing the MLP ΔW of k consecutive blocks (any start): persists for k < 12, eliminated "
        "beyond; with attention ΔW also zeroed, 4–6 blocks suffice"
    ),
    "keep_only_spans": (
        "ΔW removed from large contiguous segments at the start, middle or end: "
        "backdoor still activates as long as a few updated MLPs remain"
    ),
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
    #: ``WeightDelta.applied``, ≈ 8× cheaper: no per-condition allocation of ~0.4 GB);
    #: False = ``delta.applied``
    fast_apply: bool = True

    def __post_init__(self) -> None:
        if self.probe_tokens < 1:
            raise ValueError(f"SanityConfig.probe_tokens must be >= 1, got {self.probe_tokens}")
