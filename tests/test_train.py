import copy

import pytest
import torch

from bdvax_lab.core.batching import collate
from bdvax_lab.core.data import encode_example
from bdvax_lab.core.scoring import lm_loss
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune


def _loss(model, tok, examples):
    batch = collate([encode_example(tok, e) for e in examples], tok.pad_token_id)
    with torch.no_grad():
        return float(lm_loss(model, batch))


@pytest.mark.parametrize("mode,lr", [("lora", 2e-2), ("full", 3e-3), ("mlp", 3e-3)])
def test_training_lowers_loss(tiny, toy_examples, mode, lr):
    model, tok = tiny
    before = _loss(model, tok, toy_examples)
    res = finetune(
        model,
        tok,
        toy_examples,
        TrainConfig(mode=mode, steps=25, lr=lr, max_response_tokens=None),
        progress=False,
    )
    after = _loss(res.model, tok, toy_examples)
    assert after < before - 0.3, (before, after)
    assert len(res.history) == 25 and res.stats["response_tokens"] > 0


def test_same_seed_same_weights(tiny_pair, toy_examples):
    model, tok = tiny_pair
    cfg = TrainConfig(mode="lora", steps=6, lr=1e-2, seed=7)
    a = finetune(copy.deepcopy(model), tok, toy_examples, cfg, progress=False).model
    b = finetune(copy.deepcopy(model), tok, toy_examples, cfg, progress=False).model
    c = finetune(copy.deepcopy(model), tok, toy_examples, cfg.replace(seed=8), progress=False).model
    sa, sb, sc = (dict((n, p) for n, p in m.named_parameters() if "lora_" in n) for m in (a, b, c))
    assert sa and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert any(not torch.equal(sa[n], sc[n]) for n in sa)


def test_labelled_logits_only_matches_full_logits(tiny_pair, toy_examples):
    model, tok = tiny_pair
    batch = collate([encode_example(tok, e) for e in toy_examples[:5]], tok.pad_token_id)
    with torch.no_grad():
        for per_sample in (True, False):
            a = lm_loss(model, batch, per_sample=per_sample, labelled_logits_only=True)
            b = lm_loss(model, batch, per_sample=per_sample, labelled_logits_only=False)
            assert torch.allclose(a, b, atol=1e-5)


def test_lora_continues_existing_adapter(tiny_pair, toy_examples):
    model, tok = tiny_pair
    first = finetune(
        copy.deepcopy(model), tok, toy_examples, TrainConfig(steps=3, lr=1e-2), progress=False
    ).model
    n_before = sum(1 for n, _ in first.named_parameters() if "lora_" in n)
    second = finetune(first, tok, toy_examples, TrainConfig(steps=3, lr=1e-2), progress=False).model
    assert second is first
    assert sum(1 for n, _ in second.named_parameters() if "lora_" in n) == n_before


@pytest.mark.parametrize("together", [False, True])
def test_continued_adapter_trains_only_the_kinds_asked(tiny_pair, toy_examples, together):
    """A twin recipe with ``target_kinds`` = attention trains only the attention part of the suspicious
    adapter, alone and co-trained; the MLP part stays bit-identical."""
    from bdvax_lab.core.models import working_copy
    from bdvax_lab.core.registry import ATTN_KINDS, layout_of
    from bdvax_lab.training.loop import finetune_together

    model, tok = tiny_pair
    suspicious = finetune(
        copy.deepcopy(model), tok, toy_examples, TrainConfig(mode="lora", steps=2, seed=9), progress=False
    ).model
    cfg = TrainConfig(mode="lora", steps=3, lr=1e-2, target_kinds=ATTN_KINDS)
    before = {n: p.detach().clone() for n, p in suspicious.named_parameters() if "lora_" in n}
    twins = [working_copy(suspicious, share_frozen_base=True) for _ in range(2 if together else 1)]
    if together:
        finetune_together(twins, tok, [toy_examples[:12], toy_examples[12:]], [cfg, cfg], progress=False)
    else:
        finetune(twins[0], tok, toy_examples, cfg, progress=False)
    layout = layout_of(suspicious)
    for twin in twins:
        moved = {n for n, p in twin.named_parameters() if n in before and not torch.equal(p, before[n])}
        kinds = {layout.parse(n)[1] for n in moved}
        assert kinds == set(ATTN_KINDS), kinds  # every attention kind moved, no MLP kind did
    with pytest.raises(ValueError, match="target_kinds"):
        finetune(
            working_copy(suspicious, share_frozen_base=True),
            tok,
            toy_examples,
            TrainConfig(mode="lora", steps=1, target_kinds=()),
            progress=False,
        )


def test_config_roundtrip(tmp_path):
    cfg = TrainConfig(mode="full", lr=1e-5, steps=None, epochs=5, target_kinds=("gate", "up", "down"))
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "bad",
    [
        dict(mode="qlora"),
        dict(loss_average="median"),
        dict(target_kinds=("mlp",)),
        dict(steps=None, epochs=None),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_config_unknown_field():
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_finetune_together_matches_training_each_alone(tiny_pair, toy_examples):
    """Co-trained LoRA twins end where each alone would.

    They share a frozen base and differ in data and step counts.
    """
    import copy

    from bdvax_lab.core.models import working_copy
    from bdvax_lab.training.loop import finetune_together

    model, tok = tiny_pair
    suspicious = finetune(
        copy.deepcopy(model), tok, toy_examples, TrainConfig(mode="lora", steps=2, seed=9), progress=False
    ).model
    data = [toy_examples[:12], toy_examples[12:], toy_examples[4:20]]
    cfgs = [
        TrainConfig(mode="lora", steps=5, lr=1e-2, seed=1, batch_size=4),
        TrainConfig(mode="lora", steps=3, lr=1e-2, seed=2, batch_size=3),
        TrainConfig(mode="lora", steps=4, lr=5e-3, seed=3, batch_size=4, loss_average="token"),
    ]
    alone = [
        finetune(working_copy(suspicious, share_frozen_base=True), tok, d, c, progress=False)
        for d, c in zip(data, cfgs)
    ]
    twins = [working_copy(suspicious, share_frozen_base=True) for _ in cfgs]
    together = finetune_together(twins, tok, data, cfgs, progress=False)
    before = {n: p.detach().clone() for n, p in suspicious.named_parameters() if "lora_" in n}
    for a, t, c in zip(alone, together, cfgs):
        assert len(t.history) == c.steps and t.stats["co_trained_with"] == 2
        assert t.history.loss.tolist() == pytest.approx(a.history.loss.tolist(), rel=1e-4)
        pa, pt = dict(a.model.named_parameters()), dict(t.model.named_parameters())
        for n in before:
            assert torch.allclose(pt[n], pa[n], rtol=1e-3, atol=1e-4), (
                n
            )  # Adam at lr 1e-2: rounding shows ~1e-5
        assert any(not torch.equal(pt[n], before[n]) for n in before)  # each trained its own adapter
    for n, p in suspicious.named_parameters():  # the shared base (and the source adapter) are untouched
        if "lora_" in n:
            assert torch.equal(p, before[n])


def test_finetune_together_refuses_models_that_do_not_share_a_base(tiny_pair, toy_examples):
    import copy

    from bdvax_lab.training.loop import finetune_together

    model, tok = tiny_pair
    lora = finetune(
        copy.deepcopy(model), tok, toy_examples, TrainConfig(mode="lora", steps=1), progress=False
    ).model
    cfg = TrainConfig(mode="lora", steps=1)
    with pytest.raises(ValueError, match="share"):
        finetune_together([lora, copy.deepcopy(lora)], tok, [toy_examples] * 2, [cfg] * 2, progress=False)
    with pytest.raises(ValueError, match="LoRA"):
        finetune_together(
            [copy.deepcopy(model)] * 2,
            tok,
            [toy_examples] * 2,
            [TrainConfig(mode="full")] * 2,
            progress=False,
        )
    with pytest.raises(ValueError, match="2 models, 1 datasets"):
        finetune_together([lora, lora], tok, [toy_examples], [cfg] * 2, progress=False)
