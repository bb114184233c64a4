"""``bdvax plan``: the arithmetic against known parameter counts and the measured twin cache, placement on
K GPUs, the CLI's one-line errors, and a torch-free ``bdvax plan --help``. Fast: no model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bdvax_lab.bdvax.config import SignatureConfig
from bdvax_lab.bdvax.plan import (
    SMOLLM2_135M,
    Hardware,
    ModelShape,
    PlanConfig,
    plan,
    read_config,
    reference_gflops,
    shipped_configs,
)
from bdvax_lab.cli import main
from bdvax_lab.core.registry import ALL_KINDS

RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize(
    "config, known",
    [("llama-2-7b", 6.74e9), ("mistral-7b", 7.24e9), ("llama-2-13b", 13.0e9), (SMOLLM2_135M, 1.35e8)],
)
def test_parameter_counts_match_the_published_ones(config, known):
    data, source = read_config(config)
    assert abs(ModelShape.from_hf(data, source).params / known - 1) < 0.02


def test_shipped_configs_are_there_and_are_package_data():
    assert set(shipped_configs()) >= {"llama-2-7b", "mistral-7b", "llama-2-13b"}
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/configs/*.json"' in pyproject
    mistral = ModelShape.from_hf(*read_config("mistral-7b"))
    assert (mistral.n_kv_heads, mistral.head_dim, mistral.kv_dim) == (8, 128, 1024)
    nulls = ModelShape.from_hf({**SMOLLM2_135M, "head_dim": None, "num_key_value_heads": None})
    assert (nulls.head_dim, nulls.n_kv_heads) == (64, 9)


def test_twin_cache_size_matches_the_measured_one():
    measured = json.loads((RESULTS / "twin_cache_size.json").read_text())
    r = measured["lora_r"]
    m = ModelShape.from_hf(SMOLLM2_135M)
    dense = measured["cache_bytes_per_variant"]["dense_bytes"]
    factored = measured["cache_bytes_per_variant"]["factored_bytes"]
    assert abs(m.cache_bytes(ALL_KINDS) / dense - 1) < 0.05  # 424.7 MB
    assert abs(m.cache_bytes(ALL_KINDS, r=r) / factored - 1) < 0.10  # 19.7 MB
    _, summary = plan(SMOLLM2_135M, PlanConfig.from_pipeline("lora", dtype_bytes=4), Hardware(cpu_gflops=100))
    assert summary["cache_factored_bytes_per_variant"] == m.cache_bytes(ALL_KINDS, r=8)
    assert summary["cache_bytes_total"] == 6 * summary["cache_factored_bytes_per_variant"]


def test_workload_follows_the_pipeline_configs():
    w = PlanConfig.from_pipeline("lora")
    assert (w.n_variants, w.twin_steps, w.clean_steps, w.twin_batch, w.twin_response_tokens) == (
        6,
        60,
        30,
        4,
        16,
    )
    assert (w.repair_samples, w.repair_epochs, w.repair_batch, w.lora_r) == (200, 5.0, 8, 8)
    assert (w.eval_prompts, w.eval_new_tokens, w.eval_batch) == (50, 32, 50)
    # bdvax purify's default budget is calibrated: 6 × (1 + 7 ρ × 4 head budgets) = 174 points, the count
    # the calibration measured on SmolLM2 (results/purify-badnets-refusal-lora-format-seed1-auto-heads.csv)
    assert w.calibration_curve == 29 and w.n_variants * w.calibration_curve == 174
    fixed = PlanConfig.from_pipeline("lora", signature=SignatureConfig(rho=0.8))
    assert fixed.calibration_curve == 0
    df, _ = plan(SMOLLM2_135M, w)
    assert "calibration" in set(df.stage) and "calibration" not in set(plan(SMOLLM2_135M, fixed)[0].stage)
    assert df.set_index("stage").loc["calibration", "jobs"] == 174


def test_full_costs_more_than_lora_and_checkpointing_trades_flops_for_memory():
    lora, _ = plan("llama-2-7b", PlanConfig.from_pipeline("lora"))
    full, _ = plan("llama-2-7b", PlanConfig.from_pipeline("full"))
    ckpt, _ = plan("llama-2-7b", PlanConfig.from_pipeline("lora", gradient_checkpointing=True))
    twins = {
        n: df.set_index("stage").loc["twins"] for n, df in (("lora", lora), ("full", full), ("ck", ckpt))
    }
    assert 1.3 < twins["full"].flops / twins["lora"].flops < 1.6  # 6PT vs 4PT (+ attention and adapters)
    assert (
        twins["full"].optimizer_gb > 8 * twins["full"].weights_gb / 2 > 0 and twins["lora"].optimizer_gb == 0
    )
    assert twins["ck"].activations_gb < twins["lora"].activations_gb / 5
    assert twins["ck"].flops > twins["lora"].flops


def test_memory_with_more_gpus():
    one, _ = plan("llama-2-7b", hardware=Hardware(gpus=1))
    eight, _ = plan("llama-2-7b", hardware=Hardware(gpus=8))
    a, b = one.set_index("stage").loc["twins"], eight.set_index("stage").loc["twins"]
    # 12 independent twin jobs: a replica per GPU, the same memory on each, 8× over the cluster, 8× faster
    assert a.per_device_gb == pytest.approx(b.per_device_gb)
    assert b.cluster_gb == pytest.approx(8 * a.cluster_gb)
    assert a.seconds == pytest.approx(8 * b.seconds)
    # the full setting does not fit one 80 GB GPU; on 8 it is sharded and each GPU holds less
    full = PlanConfig.from_pipeline("full")
    f1, s1 = plan("llama-2-7b", full, Hardware(gpus=1))
    f8, s8 = plan("llama-2-7b", full, Hardware(gpus=8))
    t1, t8 = f1.set_index("stage").loc["twins"], f8.set_index("stage").loc["twins"]
    assert not s1["fits"] and s8["fits"]
    assert t8.shard >= 2 and t8.per_device_gb <= 80 < t1.per_device_gb


def test_cpu_plan_from_the_reference_step():
    g = reference_gflops(1.1)
    assert 50 < g < 1000  # two cores, fp32
    df, summary = plan(
        SMOLLM2_135M, PlanConfig.from_pipeline(dtype_bytes=4), Hardware(cpu_gflops=g, train_mfu=1)
    )
    assert "CPU" in summary["device"] and (df.devices_used == 1).all()
    assert reference_gflops(2.2) == pytest.approx(g / 2)


def _write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({k: v for k, v in SMOLLM2_135M.items() if k != "hidden_size"}, "'hidden_size' is missing"),
        ({**SMOLLM2_135M, "vocab_size": "big"}, "'vocab_size' must be a positive integer"),
        ({**SMOLLM2_135M, "num_key_value_heads": 4}, "'num_key_value_heads' (4) must divide"),
        ({**SMOLLM2_135M, "tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, capsys, data, needle):
    path = _write(tmp_path, data)
    assert main(["plan", "--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and needle in err, err


def test_missing_config_and_bad_flags_are_one_line(capsys):
    assert main(["plan", "--config", "llama-9b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama-9b" in err and "llama-2-7b" in err
    for argv in (["--gpus", "0"], ["--gpu-tflops", "-1"], ["--train-mfu", "2"], ["--setting", "half"]):
        assert main(["plan", "--config", "llama-2-7b", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and argv[-1] in err, err


def test_cli_prints_the_table(capsys, tmp_path):
    assert main(["plan", "--config", "mistral-7b", "--gpus", "8", "--setting", "full"]) == 0
    out = capsys.readouterr().out
    assert "twins" in out and "repair" in out and "evaluation" in out and "7.24 B parameters" in out
    path = _write(tmp_path, SMOLLM2_135M)
    assert main(["plan", "--config", path, "--cpu-gflops", "100"]) == 0
    assert "CPU at 100 GFLOP/s" in capsys.readouterr().out


def test_plan_help_and_run_import_no_torch():
    code = (
        "import sys; from bdvax_lab.cli import main; main(['plan', '--config', 'llama-2-7b']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bdvax_lab.cli", "plan", "--help"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "--gpu-tflops" in run.stdout
    assert " torch\n" not in run.stderr and "| torch" not in run.stderr


def test_plan_counts_the_text_perplexity_pass():
    from dataclasses import replace

    from bdvax_lab.bdvax.plan import eval_flops
    from bdvax_lab.threat.config import EvalConfig

    w = PlanConfig.from_pipeline("lora")
    assert (w.n_text, w.text_tokens) == (100, 128)
    assert PlanConfig.from_pipeline("lora", eval=EvalConfig(n_text=0)).n_text == 0
    assert PlanConfig.from_pipeline("lora", eval=EvalConfig(n_text=None)).n_text == 120
    assert PlanConfig.from_pipeline("lora", eval=EvalConfig(utility=("mcq",))).n_text == 0
    m = ModelShape.from_hf(SMOLLM2_135M)
    more, _, _ = eval_flops(m, w)
    less, _, _ = eval_flops(m, replace(w, n_text=0))
    assert more > less
