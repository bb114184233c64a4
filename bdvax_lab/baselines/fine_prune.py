"""``fine_prune``: Fine-Pruning with a Wanda score (full setting) or random channels (adapter setting)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..core.batching import collate, pad_token
from ..core.data import Example, encode_example
from ..core.registry import CHANNEL_DIM, MLP_KINDS, Key, layout_of, setting_of, unwrap
from ..weights.selection import _key_str, _parse_key, select_lowest
from .common import _clean_examples, _finish, _prepare, _prune, _selection_summary
from .config import FINE_PRUNE_SCORES, FinePruneConfig, _resolved_rho
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


# =========================================================================== fine-pruning (Wanda)
def wanda_channel_scores(weight: torch.Tensor, input_norm: torch.Tensor, kind: str) -> torch.Tensor:
    """Channel scores from Wanda's per-weight score ``|W_ij|·‖X_j‖₂`` (``weight`` is [out, in]).

    ``input_norm`` [in]: L2 norm of each input feature over the calibration tokens.
    gate/up (channel = output row j): ``Σ_k |W_jk|·‖x_k‖``. down (channel = input
    column j): ``‖a_j‖·Σ_i |W_ij|``. Both are the sum of the per-weight Wanda
    scores over the channel's weights.
    """
    w = weight.detach().double().abs()
    n = input_norm.detach().double()
    if w.shape[1] != n.numel():
        raise ValueError(
            f"wanda_channel_scores: weight has {w.shape[1]} inputs but input_norm has {n.numel()}"
        )
    if CHANNEL_DIM[kind] == 0:
        return w @ n
    return w.sum(0) * n


@torch.no_grad()
def collect_input_norms(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    kinds: Sequence[str] = MLP_KINDS,
    batch_size: int = 8,
    max_length: int = 256,
    max_response_tokens: int | None = 32,
) -> dict[Key, torch.Tensor]:
    """L2 norm of every input feature of each (block, kind) projection over the examples' real tokens.

    Forward pre-hooks on the projections; padding positions are excluded. The
    examples are encoded as training encodes them (prompt + response through the
    chat template).
    """
    layout = layout_of(model)
    hf = unwrap(model)
    feats = [
        encode_example(tokenizer, e, max_length=max_length, max_response_tokens=max_response_tokens)
        for e in examples
    ]
    pad_id = pad_token(tokenizer)
    sums: dict[Key, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(key: Key):
        def hook(module, args):
            x = args[0]
            sel = x[state["mask"]].double()  # [tokens, in]
            acc = sums.get(key)
            sq = (sel * sel).sum(0)
            sums[key] = sq if acc is None else acc + sq

        return hook

    for b, kind, name in layout.iter_modules(kinds=tuple(kinds)):
        module = hf.get_submodule(name)
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        handles.append(module.register_forward_pre_hook(hook_for((b, kind))))
    was_training = hf.training
    hf.train(False)
    device = next(hf.parameters()).device
    try:
        order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
        for s in range(0, len(order), batch_size):
            batch = collate([feats[i] for i in order[s : s + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = batch["attention_mask"].bool()
            hf.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        hf.train(was_training)
    return {k: v.sqrt() for k, v in sums.items()}


def wanda_scores(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    score: str = "channel",
    batch_size: int = 8,
    max_length: int = 256,
    max_response_tokens: int | None = 32,
) -> dict[Key, torch.Tensor]:
    """Wanda channel scores [d_ff] of every (block, MLP kind) of a plain model on clean examples.

    Low = dormant on clean inputs.

    ``score="channel"``: one score per channel, its down column's
    ``‖a_j‖₂·Σ_i |W_down[i, j]|``, repeated under the block's gate/up/down keys.
    ``score="module"``: each projection scored on its own input (see the module docstring).
    """
    if score not in FINE_PRUNE_SCORES:
        raise ValueError(f"wanda_scores: score={score!r}; choose one of {FINE_PRUNE_SCORES}")
    if setting_of(model) == "lora":
        raise TypeError(
            "wanda_scores needs the full-model setting (activations); the adapter setting "
            "uses random sampling (paper §5.1)"
        )
    kinds = ("down",) if score == "channel" else MLP_KINDS
    norms = collect_input_norms(
        model,
        tokenizer,
        examples,
        kinds=kinds,
        batch_size=batch_size,
        max_length=max_length,
        max_response_tokens=max_response_tokens,
    )
    layout = layout_of(model)
    hf = unwrap(model)
    per_module = {
        (b, k): wanda_channel_scores(layout.weight(hf, b, k), norms[(b, k)], k)
        for b, k, _ in layout.iter_modules(kinds=kinds)
    }
    if score == "module":
        return per_module
    return {(b, k): per_module[(b, "down")] for b, k, _ in layout.iter_modules(kinds=MLP_KINDS)}


def fine_prune(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: FinePruneConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-pruning: zero some channels, then repair.

    Full setting: the channels dormant on clean inputs (Wanda scores); adapter setting: random ones.
    """
    cfg = config or FinePruneConfig()
    setting = setting_of(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    layout = layout_of(model)
    rho = _resolved_rho(cfg, setting)
    if setting == "full":
        n_calib = cfg.n_calib if cfg.n_calib is not None else cfg.repair.n_samples
        calib = _clean_examples(clean_data, n_calib)
        scores = wanda_scores(
            model,
            tokenizer,
            calib,
            score=cfg.score,
            batch_size=cfg.calib_batch_size,
            max_length=cfg.repair.max_length,
            max_response_tokens=cfg.repair.max_response_tokens,
        )
        selected = select_lowest(scores, rho=rho, scope=cfg.scope, counts=cfg.counts)
        how = {
            "score": (
                "wanda per channel (‖a_j‖₂·Σ_i|W_down[i, j]| on clean tokens, shared by gate/up/down)"
                if cfg.score == "channel"
                else "wanda per module (sum over the channel of |W|·‖X‖₂ on clean tokens)"
            ),
            "n_calib": len(calib),
        }
        n_modules = len(scores)
    else:
        from ..weights.selection import Selection, random_selection

        hf = unwrap(model)
        present = {
            (b, k)
            for b, k, name in layout.iter_modules(kinds=MLP_KINDS)
            if hasattr(hf.get_submodule(name), "lora_A")
        }
        if cfg.counts is not None:
            like = Selection(
                {_parse_key(k): torch.zeros(int(v), dtype=torch.long) for k, v in cfg.counts.items()}
            )
            sel = random_selection(layout, seed=cfg.seed, like=like)
        else:
            sel = random_selection(layout, rho, cfg.scope, seed=cfg.seed)
        selected = {k: v for k, v in sel.selected.items() if k in present and v.numel()}
        how = {"score": "random (paper §5.1: the adapter setting has no activations)", "seed": cfg.seed}
        n_modules = len(present)
    sup = _prune(model, selected, setting)
    t_int = time.time() - t0
    intervention = {
        "kind": "fine_prune",
        **how,
        "rho": None if cfg.counts else rho,
        "scope": "counts" if cfg.counts else cfg.scope,
        "action": "zero",
        **_selection_summary(selected, layout.d_ff, n_modules),
        "suppression": sup.to_dict()["counts"],
        "selected": {_key_str(k): v.tolist() for k, v in selected.items()},
    }
    return _finish(
        "fine_prune", model, tokenizer, clean_data, cfg, setting, intervention, t0, t_int, progress, on_stage
    )


register_defence(
    "fine_prune",
    fine_prune,
    FinePruneConfig,
    paper_settings=("lora", "full"),
    description="prune channels dormant on clean data (Wanda; random in the adapter setting), then repair",
)
