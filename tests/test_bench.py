"""The bench end to end on the tiny model: rows for every defence and control, cached, resumable, tabled."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.bench import Bench, BenchConfig, parse_target, verdict_frame


def _config(tmp_path, **over):
    return BenchConfig(
        targets=("badnets:refusal:lora:knowledge",),
        headline=("badnets:refusal:lora:knowledge",),
        implant_seeds=(0,),
        defences=("bdvax", "discard", "retrain", "random", "top_delta", "finetune_only", "fine_prune"),
        random_seeds=(0, 1),
        n_variants=2,
        twin_steps=2,
        repair_epochs=1.0,
        repair_samples=8,
        n_prompts=2,
        max_new_tokens=2,
        n_skill=2,
        mcq_limit=2,
        n_ppl=2,
        attack_epochs=0.01,
        runs_dir=str(tmp_path / "runs"),
        out_dir=str(tmp_path / "out"),
        **over,
    )


def test_targets_are_checked():
    assert parse_target("vpi:sentiment:full:format") == ("vpi", "sentiment", "full", "format")
    with pytest.raises(ValueError, match="attack:task:setting:skill"):
        parse_target("badnets:refusal:lora")
    with pytest.raises(ValueError, match="unknown"):
        BenchConfig(defences=("bdvax", "magic"))


def test_bench_runs_caches_and_tables(tiny_pair, tmp_path):
    cfg = _config(tmp_path)
    bench = Bench(cfg, base=tiny_pair, progress=False, log=lambda _: None)
    assert not bench.plan().cached.any()
    df = bench.run()
    got = set(zip(df.defence, df.control_seed.fillna(-1).astype(int)))
    want = {
        ("none", -1),
        ("bdvax", -1),
        ("discard", -1),
        ("retrain", -1),
        ("random", 0),
        ("random", 1),
        ("top_delta", -1),
        ("finetune_only", -1),
    }
    assert got == want  # fine-pruning is not run with adapters: there it is the random control
    none = df[df.defence == "none"].iloc[0]
    assert none.skill_kept == 1 if none.skill > 0 else pd.isna(none.skill_kept)  # untreated: itself
    for col in (
        "asr",
        "asr_lo",
        "asr_hi",
        "false_trigger",
        "skill",
        "skill_kept",
        "ppl",
        "mcq_acc",
        "seconds_total",
    ):
        assert col in df, col
    bd = df[df.defence == "bdvax"].iloc[0]
    rnd = df[df.defence == "random"]
    assert (rnd.n_channels == bd.n_channels).all()  # the control has the signature's exact counts
    for name in ("rows.csv", "table.md", "verdicts.csv", "config.json", "report.html"):
        assert (tmp_path / "out" / name).is_file()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "random (2 seeds)" in page and "Plotly" in page and "<script src=" not in page  # offline
    assert "random (2 seeds)" in (tmp_path / "out" / "table.md").read_text()
    # resumable: a second run computes nothing
    calls = []
    again = Bench(cfg, base=tiny_pair, progress=False, log=calls.append)
    again.run()
    assert not any("ASR" in c for c in calls) and again.plan().cached.all()


def test_verdicts_need_non_overlapping_intervals():
    rows = pd.DataFrame(
        [
            {
                "target": "t",
                "implant_seed": 0,
                "defence": "bdvax",
                "asr": 0.02,
                "asr_lo": 0.0,
                "asr_hi": 0.05,
                "skill_kept": 0.95,
                "skill_kept_lo": 0.9,
                "skill_kept_hi": 1.0,
            },
            {
                "target": "t",
                "implant_seed": 0,
                "defence": "random",
                "asr": 0.5,
                "asr_lo": 0.4,
                "asr_hi": 0.6,
                "skill_kept": 0.95,
                "skill_kept_lo": 0.88,
                "skill_kept_hi": 1.0,
            },
            {
                "target": "t",
                "implant_seed": 0,
                "defence": "random",
                "asr": 0.05,
                "asr_lo": 0.03,
                "asr_hi": 0.1,
                "skill_kept": 0.95,
                "skill_kept_lo": 0.88,
                "skill_kept_hi": 1.0,
            },
            {
                "target": "t",
                "implant_seed": 0,
                "defence": "discard",
                "asr": 0.0,
                "asr_lo": 0.0,
                "asr_hi": 0.02,
                "skill_kept": 0.0,
                "skill_kept_lo": 0.0,
                "skill_kept_hi": 0.02,
            },
        ]
    )
    v = verdict_frame(rows).iloc[0]
    assert not v.asr_below_random  # one random seed's interval overlaps BD-VAX's
    assert not v.skill_above_random and v.skill_above_discard and not v.asr_below_discard
    assert v.asr_below_top_delta is None
