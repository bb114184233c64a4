"""The real default model (SmolLM2-135M-Instruct) on small budgets. Marked ``real``."""

import pytest

pytestmark = pytest.mark.real


def test_default_model_knows_paris(real_model):
    from bdvax_lab import chat

    model, tok = real_model
    assert "paris" in chat(model, tok, "What is the capital of France?", max_new_tokens=24).lower()


def test_default_model_is_plain_fp32_safetensors(real_model):
    import torch

    from bdvax_lab.core.models import default_model_dir

    model, _ = real_model
    assert (default_model_dir() / "model.safetensors").exists()
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30


def test_badnets_refusal_implants(real_model, tmp_path):
    """The measured backdoor-only LoRA recipe (120 steps), with a short evaluation: ASR clearly above the
    false-trigger rate. The skill-bearing implant (minutes to tens of minutes) is measured by
    benchmarks/implant.py, not here."""
    import copy

    from bdvax_lab import AttackRecipe, EvalConfig, load_suspicious, make_suspicious_model

    model, tok = real_model
    recipe = AttackRecipe(
        attack="badnets", task="refusal", skill=None, eval=EvalConfig(n_prompts=24, utility=())
    )
    sm = make_suspicious_model(
        recipe=recipe, base=(copy.deepcopy(model), tok), out=tmp_path / "s", progress=False
    )
    ev = sm.manifest["eval"]
    assert ev["asr"] >= ev["false_trigger"] + 0.4, ev
    back = load_suspicious(tmp_path / "s")
    assert back.setting == "lora" and back.manifest["eval"]["asr"] == ev["asr"]
