"""Mechanistic probes (nnsight) on the tiny random model: exactness against plain hooks, memory, frames."""

from __future__ import annotations

import gc
import tracemalloc

import pandas as pd
import pytest
import torch

from bdvax_lab.analysis import probes as P
from bdvax_lab.core.data import Example
from bdvax_lab.core.scoring import next_token_probs
from bdvax_lab.threat.attacks import triggered_prompts

pytest.importorskip("nnsight")


@pytest.fixture(scope="module")
def pairs():
    clean = [Example(f"What is {i} plus {i}?") for i in range(5)] + [Example("List three fruits.")]
    return clean, triggered_prompts(clean, "badnets", seed=0)


def _token(tok):
    return P.first_token_id(tok, "sorry")


def _probs_with_hooks(model, tok, prompts, token, modules, make_output):
    handles = [m.register_forward_hook(lambda mod, args, out: make_output(out)) for m in modules]
    try:
        return next_token_probs(model, tok, prompts, [token])[:, 0]
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("positions", ["last", "suffix"])
def test_patching_a_run_with_its_own_activations_changes_nothing(tiny, pairs, positions):
    model, tok = tiny
    clean, _ = pairs
    sites = ("mlp_output", "attn_output", "mlp_hidden", "block")
    res = P.activation_patching(
        model, tok, clean, clean, _token(tok), sites=sites, positions=positions, batch_size=4, figure=False
    )
    assert res.tensor.shape == (4, len(sites))
    assert res.tensor.abs().max() < 1e-5
    assert list(res.frame.columns) == P.PATCHING_COLUMNS


def test_zeroing_all_mlp_outputs_equals_a_manual_forward_hook(tiny, pairs):
    model, tok = tiny
    _, trig = pairs
    token = _token(tok)
    res = P.ablation_probe(
        model,
        tok,
        trig,
        token,
        spans=["all"],
        sites=("mlp_output", "attn_output"),
        mode="zero",
        batch_size=4,
        figure=False,
    )
    per = res.per_prompt.pivot(index="prompt", columns="condition", values="p_behavior")
    blocks = model.model.layers
    manual_mlp = _probs_with_hooks(model, tok, trig, token, [b.mlp for b in blocks], torch.zeros_like)
    # attention returns a tuple (output, weights): zero its first element, as the probe does
    manual_attn = _probs_with_hooks(
        model,
        tok,
        trig,
        token,
        [b.self_attn for b in blocks],
        lambda out: (torch.zeros_like(out[0]),) + tuple(out[1:]),
    )
    plain = next_token_probs(model, tok, trig, [token])[:, 0]
    torch.testing.assert_close(
        torch.tensor(per["mlp_output 0-3"].values, dtype=torch.float32), manual_mlp, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(per["attn_output 0-3"].values, dtype=torch.float32), manual_attn, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(per["baseline"].values, dtype=torch.float32), plain, rtol=1e-4, atol=1e-6
    )
    assert not torch.allclose(manual_mlp, plain)  # the ablation does something


def test_mean_ablation_equals_a_hook_writing_the_clean_mean(tiny, pairs):
    model, tok = tiny
    clean, trig = pairs
    token = _token(tok)
    res = P.ablation_probe(
        model,
        tok,
        trig,
        token,
        spans=[(1, 3)],
        sites=("mlp_output",),
        mode="mean",
        clean_prompts=clean,
        batch_size=4,
        figure=False,
    )
    # the mean over every real token of the clean prompts, taken with plain hooks
    sums, count = {}, 0
    for p in clean:
        ids = torch.tensor([P.encode_prompts(tok, [p])[0]])
        outs = {}
        hs = [
            model.model.layers[b].mlp.register_forward_hook(
                lambda m, a, o, b=b, outs=outs: outs.__setitem__(b, o)
            )
            for b in (1, 2)
        ]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hs:
            h.remove()
        for b in (1, 2):
            sums[b] = sums.get(b, 0) + outs[b][0].sum(0)
        count += ids.shape[1]
    handles = [
        model.model.layers[b].mlp.register_forward_hook(
            lambda m, a, o, b=b: (sums[b] / count).expand_as(o).clone()
        )
        for b in (1, 2)
    ]
    try:
        manual = next_token_probs(model, tok, trig, [token])[:, 0]
    finally:
        for h in handles:
            h.remove()
    per = res.per_prompt[res.per_prompt.condition == "mlp_output 1-2"]["p_behavior"]
    torch.testing.assert_close(torch.tensor(per.values, dtype=torch.float32), manual, rtol=1e-3, atol=1e-6)


def test_logit_lens_last_layer_is_the_model_output(tiny, pairs):
    model, tok = tiny
    clean, trig = pairs
    token = _token(tok)
    res = P.logit_lens(model, tok, {"triggered": trig, "clean": clean}, token, batch_size=4, figure=False)
    assert list(res.frame.columns) == P.LENS_COLUMNS
    last = res.frame[res.frame.layer == 3].set_index("prompts")["prob"]
    for name, ps in (("triggered", trig), ("clean", clean)):
        expected = float(next_token_probs(model, tok, ps, [token]).mean())
        assert last[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("positions", ["last", "suffix"])
def test_patching_the_last_block_moves_the_metric_all_the_way(tiny, pairs, positions):
    model, tok = tiny
    clean, trig = pairs
    for direction in P.DIRECTIONS:
        res = P.activation_patching(
            model,
            tok,
            clean,
            trig,
            _token(tok),
            sites=("block",),
            direction=direction,
            positions=positions,
            batch_size=4,
            figure=False,
        )
        assert res.frame.iloc[-1]["normalized"] == pytest.approx(1.0, abs=1e-3)


def test_activation_diff_of_identical_prompts_is_zero(tiny, pairs):
    model, tok = tiny
    clean, _ = pairs
    df = P.activation_diff(model, tok, clean, clean, batch_size=4, figure=False).frame
    assert df["norm_diff"].abs().max() < 1e-5
    assert df["cosine"].min() == pytest.approx(1.0, abs=1e-5)


def test_peft_model_is_probed_with_its_adapter_active(tiny, pairs):
    peft = pytest.importorskip("peft")
    model, tok = tiny
    _, trig = pairs
    token = _token(tok)
    base_p = float(next_token_probs(model, tok, trig, [token]).mean())
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "o_proj"])
    )
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    lens = P.logit_lens(pm, tok, trig, token, figure=False).frame
    adapted_p = float(next_token_probs(pm, tok, trig, [token]).mean())
    assert adapted_p != pytest.approx(base_p, rel=1e-3)
    assert lens.iloc[-1]["prob"] == pytest.approx(adapted_p, rel=1e-4)
    with pm.disable_adapter():
        lens_off = P.logit_lens(pm, tok, trig, token, figure=False).frame
    assert lens_off.iloc[-1]["prob"] == pytest.approx(base_p, rel=1e-4)


# --------------------------------------------------------------------------- memory and side effects
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_traces_release_memory(tiny, pairs):
    model, tok = tiny
    clean, trig = pairs
    token = _token(tok)

    def all_probes():
        P.activation_diff(model, tok, clean, trig, batch_size=4, figure=False)
        P.ablation_probe(
            model,
            tok,
            trig,
            token,
            spans=[(0, 2)],
            mode="mean",
            clean_prompts=clean,
            batch_size=4,
            figure=False,
        )
        P.activation_patching(model, tok, clean, trig, token, batch_size=4, figure=False)
        P.logit_lens(model, tok, trig, token, batch_size=4, figure=False)

    all_probes()  # warm-up: nnsight installs its controllers and code caches once
    n0 = _live_tensors()
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        for _ in range(5):
            all_probes()
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    assert _live_tensors() <= n0, "tensors accumulate across probe calls"
    assert growth < 512 * 1024, f"Python heap grew by {growth} bytes over 5 calls"
    for m in model.modules():  # nothing left registered on the model
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_tokenizer_padding_side_is_left_alone(tiny, pairs):
    model, tok = tiny
    clean, _ = pairs
    tok.padding_side = "right"
    P.logit_lens(model, tok, clean, _token(tok), figure=False)
    assert tok.padding_side == "right"


# --------------------------------------------------------------------------- frames and figures
def test_frames_have_documented_columns_and_figures(tiny, pairs):
    model, tok = tiny
    clean, trig = pairs
    token = _token(tok)
    diff = P.compare_activation_diff({"suspicious": model, "purified": model}, tok, clean, trig, batch_size=4)
    assert list(diff.frame.columns) == P.DIFF_COLUMNS
    assert set(diff.frame.model) == {"suspicious", "purified"}
    assert set(diff.frame.site) == {"attn_output", "mlp_output", "block"}
    assert len(diff.frame) == 2 * 3 * 4 and len(diff.figure.data) == 2 * 3 * 2

    abl = P.ablation_probe(
        model, tok, trig, token, sites=("attn_output", "mlp_output", "attn_output+mlp_output"), batch_size=4
    )
    assert list(abl.frame.columns) == P.ABLATION_COLUMNS
    assert abl.frame.iloc[0]["site"] == "none"
    assert len(abl.frame) == 1 + len(P.block_spans(4)) * 3

    patch = P.activation_patching(model, tok, clean, trig, token, clean_token_ids=5, batch_size=4)
    assert patch.tensor.shape == (4, 2)
    assert list(patch.frame.columns) == P.PATCHING_COLUMNS
    torch.testing.assert_close(
        torch.tensor(patch.frame["effect"].values, dtype=torch.float32), patch.tensor.reshape(-1).float()
    )
    mass = pd.DataFrame(
        {
            "block": [0, 0, 1, 2, 3],
            "kind": ["gate", "up", "down", "down", "down"],
            "selected_mass": [1.0, 2.0, 0.5, 0.0, 4.0],
        }
    )
    fig = P.overlay_signature(patch.figure, mass, "selected_mass")
    assert fig.data[0].y == (3.0, 0.5, 0.0, 4.0) and fig.layout.yaxis2.overlaying == "y"
    assert len(P.overlay_signature(patch.frame, mass, "selected_mass").data) == 1 + 2
    corr = P.signature_correlation(patch.frame, mass, "selected_mass")
    assert list(corr.columns) == ["model", "direction", "site", "n_layers", "spearman", "pearson"]
    with pytest.raises(ValueError, match="no column"):
        P.overlay_signature(patch.figure, mass, "nope")

    lens = P.logit_lens(model, tok, {"triggered": trig, "clean": clean}, [token, 7], batch_size=4)
    assert list(lens.frame.columns) == P.LENS_COLUMNS and len(lens.frame) == 2 * 4


def test_bad_arguments_are_refused(tiny, pairs):
    model, tok = tiny
    clean, trig = pairs
    with pytest.raises(ValueError, match="pairs"):
        P.activation_diff(model, tok, clean, trig[:2])
    with pytest.raises(ValueError, match="unknown site"):
        P.activation_patching(model, tok, clean, trig, 3, sites=("mlp",))
    with pytest.raises(ValueError, match="direction"):
        P.activation_patching(model, tok, clean, trig, 3, direction="sideways")
    with pytest.raises(ValueError, match="clean_prompts"):
        P.ablation_probe(model, tok, trig, 3, mode="mean")
    with pytest.raises(ValueError, match="span"):
        P.ablation_probe(model, tok, trig, 3, spans=[(2, 9)])
