"""The bench end to end on the tiny model: rows for every defence and control, cached, resumable, tabled."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bdvax_lab.core.artifacts import read_json
from experiments.bench import (
    Bench,
    BenchConfig,
    _auto_grid_note,
    parse_row_name,
    parse_target,
    row_name,
    table_markdown,
    verdict_frame,
)


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


def test_bench_runs_caches_and_tables(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BDVAX_CACHE", str(tmp_path / "cache"))  # its twins and distilled data, not the user's
    cfg = _config(tmp_path)
    cfg = cfg.replace(defences=(*cfg.defences, "bdvax_auto", "mb_faithful"))
    bench = Bench(cfg, base=tiny_pair, progress=False, log=lambda _: None)
    assert not bench.plan().cached.any()
    assert bench.plan(seeds=[1]).empty and len(bench.plan(["badnets:refusal:lora:knowledge"], [0]))
    df = bench.run()
    got = set(zip(df.defence, df.control_seed.fillna(-1).astype(int)))
    want = {
        ("none", -1),
        ("bdvax", -1),
        ("bdvax_auto", -1),
        ("discard", -1),
        ("retrain", -1),
        ("random", 0),
        ("random", 1),
        ("top_delta", -1),
        ("finetune_only", -1),
        ("mb_faithful", -1),
        ("none_mb", -1),
    }
    assert got == want  # fine-pruning is not run with adapters: there it is the random control
    none = df[df.defence == "none"].iloc[0]
    assert none.ppl_text_ratio == pytest.approx(1.0)
    assert none.skill_kept == 1 if none.skill > 0 else pd.isna(none.skill_kept)  # untreated: itself
    for col in (
        "asr",
        "asr_lo",
        "asr_hi",
        "false_trigger",
        "skill",
        "skill_kept",
        "ppl",
        "ppl_text",
        "ppl_text_ratio",
        "mcq_acc",
        "seconds_total",
    ):
        assert col in df, col
    bd = df[df.defence == "bdvax"].iloc[0]
    rnd = df[df.defence == "random"]
    assert (rnd.n_channels == bd.n_channels).all()  # the control has the signature's exact counts
    auto = df[df.defence == "bdvax_auto"].iloc[0]  # ρ from the defender's own held-out variants, recorded
    assert auto.kind == "method" and 0 < auto.rho <= 1 and isinstance(auto.calibration_reason, str)
    # the curve it chose from ("ρ:held-out ASR" pairs; empty when no tiny twin learnt its key)
    assert isinstance(auto.calibration_curve, str)
    assert f"{auto.rho:g}:" in auto.calibration_curve or "no held-out twin" in auto.calibration_reason
    for name in ("rows.csv", "table.md", "verdicts.csv", "config.json", "report.html"):
        assert (tmp_path / "out" / name).is_file()
    page = (tmp_path / "out" / "report.html").read_text()
    assert "random (2 seeds)" in page and "Plotly" in page and "<script src=" not in page  # offline
    table = (tmp_path / "out" / "table.md").read_text()
    assert "random (2 seeds)" in table and "ρ chosen without the trigger" in table
    # the in-training arm has its own suspicious model, evaluated untreated as well
    mb = df[df.defence == "none_mb"].iloc[0]
    assert mb.kind == "untreated" and mb.defensive_poison > 0
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
    assert "asr_below_drop_attention" not in v  # a bench that did not run it keeps its columns
    drop = rows.iloc[[1]].assign(defence="drop_attention", asr_lo=0.06, skill_kept_hi=0.89)
    v = verdict_frame(pd.concat([rows, drop])).iloc[0]
    assert v.asr_below_drop_attention and v.skill_above_drop_attention and v.beaten_by is None
    # the reverse: controls whose every interval is better than BD-VAX's are named, overlap is not
    lost = pd.DataFrame(
        [
            {"defence": d, "asr_lo": a[0], "asr_hi": a[1], "skill_kept_lo": k[0], "skill_kept_hi": k[1]}
            for d, a, k in (
                ("bdvax", (0.0, 0.02), (0.25, 0.39)),
                ("random", (0.0, 0.02), (0.63, 0.75)),
                ("random", (0.0, 0.02), (0.65, 0.81)),
                ("top_delta", (0.0, 0.02), (0.38, 0.61)),  # overlaps BD-VAX's skill interval
                ("discard", (0.0, 0.02), (0.0, 0.02)),
            )
        ]
    ).assign(target="t", implant_seed=0, asr=0.0, skill_kept=0.5)
    assert verdict_frame(lost).iloc[0].beaten_by == "random:skill"
    high = lost.assign(asr_lo=lost.asr_lo + (lost.defence == "bdvax") * 0.5, asr_hi=0.6)
    assert verdict_frame(high.assign(asr_hi=[0.6, 0.4, 0.45, 0.6, 0.3])).iloc[0].beaten_by == (
        "random:asr, random:skill, discard:asr"
    )


def test_defender_controlled_training_rows_get_their_own_table():
    def row(defence, kind, asr, keep):
        return {
            "target": "t",
            "setting": "lora",
            "skill_name": "format",
            "implant_seed": 0,
            "defence": defence,
            "kind": kind,
            "asr": asr,
            "asr_lo": asr - 0.05,
            "asr_hi": asr + 0.05,
            "false_trigger": 0.0,
            "skill": keep,
            "skill_kept": keep,
            "skill_kept_lo": keep - 0.05,
            "skill_kept_hi": keep + 0.05,
            "ppl": 10.0,
            "ppl_ratio": 1.0,
            "mcq_acc": 0.5,
            "reference": False,
        }

    df = pd.DataFrame(
        [
            row("none", "untreated", 0.99, 1.0),
            row("bdvax", "method", 0.7, 0.5),
            row("sande_oracle", "baseline", 0.3, 0.9),
            row("none_mb", "untreated", 0.98, 0.97),
            row("mb_faithful", "in_training", 0.2, 0.8),
        ]
    )
    df["gate"] = [None, None, 0.25, None, None]
    df["defensive_rates"] = [None, None, None, None, {"bb": 1.0, "qw": 0.5}]
    df["merged"] = [None, None, None, None, False]
    text = table_markdown(df, verdict_frame(df), BenchConfig())
    gates = text.partition("### Gates")[2]
    assert "| t | 0 | sande_oracle | 0.25 | — | — |" in gates
    assert "| t | 0 | mb_faithful | — | bb 1.00, qw 0.50 | no |" in gates
    main, _, own = text.partition("### The defender controls training")
    assert own, "no table of its own for the in-training arm"
    assert "mb_faithful" not in main and "none_mb" not in main
    assert "| t | 0 | mb_faithful |" in own and "| t | 0 | none_mb |" in own and "| t | 0 | none |" in own
    assert "sande_oracle ‡" in main and "bdvax ‡" not in main  # the oracle arm is marked as knowing more


def test_in_domain_repair_data_mixes_task_inputs_without_answers():
    from bdvax_lab.threat.skills import held_out_items

    assert BenchConfig().repair_instructions("format") is None  # the default bench: the shipped repair split
    cfg = BenchConfig(repair_in_domain=0.25)
    items = cfg.repair_instructions("format")
    assert len(items) == cfg.repair_samples
    task = [e for e in items if e.meta.get("split") == "task_input"]
    assert len(task) == 50 and all(e.meta["skill"] == "format" for e in task)
    assert all(not e.response for e in items)  # the suspicious model answers every one
    assert all("gold" not in e.meta for e in items)
    held = {(e.instruction, e.input) for e in held_out_items("format")}
    assert not held & {(e.instruction, e.input) for e in items}  # never the evaluation's items
    assert items == cfg.repair_instructions("format")  # seeded
    assert Bench(cfg).rows_dir != Bench(BenchConfig()).rows_dir  # its own rows
    with pytest.raises(ValueError, match="repair_in_domain"):
        BenchConfig(repair_in_domain=1.5)


def test_heads_grid_reaches_the_calibration_and_keeps_older_rows():
    assert Bench(BenchConfig(heads_grid=None)).rows_dir == Bench(BenchConfig()).rows_dir
    cfg = BenchConfig(heads_grid=(90, 0, 90))
    assert cfg.heads_grid == (0, 90) and Bench(cfg).rows_dir != Bench(BenchConfig()).rows_dir
    with pytest.raises(ValueError, match="head counts"):
        BenchConfig(heads_grid=(-3,))
    # the table says which head budgets its bdvax_auto rows searched, and when that is not the CLI's default
    assert "not its default" in _auto_grid_note(BenchConfig())
    note = _auto_grid_note(cfg)
    assert "0, 90" in note and "not its default" not in note


def test_tables_refuse_to_drop_rows_measured_elsewhere(tmp_path, monkeypatch):
    """A fresh clone has the committed table but not its row cache: tabling must not shrink the table."""
    cfg = _config(tmp_path)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    committed = pd.DataFrame(
        [
            {"target": "t", "implant_seed": 0, "defence": "none", "control_seed": None, "asr": 1.0},
            {"target": "t", "implant_seed": 0, "defence": "random", "control_seed": 1, "asr": 0.5},
        ]
    )
    committed.to_csv(out / "rows.csv", index=False)
    before = (out / "rows.csv").read_text()
    bench = Bench(cfg, progress=False, log=lambda _: None)
    assert bench.rows_elsewhere(committed) == 0
    assert bench.rows_elsewhere(committed.iloc[:1]) == 1  # the random seed-1 row is not in the cache
    assert [parse_row_name(row_name(d, s)) for d, s in (("random", 1), ("bdvax", None))] == [
        ("random", 1),
        ("bdvax", None),
    ]
    monkeypatch.setattr(Bench, "frame", lambda self: committed.iloc[:1].copy())
    with pytest.raises(ValueError, match="has 1 row"):
        bench.tables()
    (out / "rows.csv").write_text("")  # an empty or broken table is named, not a pandas traceback
    with pytest.raises(ValueError, match=r"rows\.csv: not a readable bench table"):
        bench.committed()
    (out / "rows.csv").write_text(before)
    assert (out / "rows.csv").read_text() == before and not (out / "table.md").exists()


def test_a_bench_without_repair_runs_suppression_only(tiny_pair, tmp_path, monkeypatch):
    """``repair=False``: BD-VAX and the selection controls skip the repair; training-only defences go."""
    assert Bench(BenchConfig(repair=True)).rows_dir == Bench(BenchConfig()).rows_dir  # older rows kept
    assert Bench(BenchConfig(repair=False)).rows_dir != Bench(BenchConfig()).rows_dir
    monkeypatch.setenv("BDVAX_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, repair=False).replace(random_seeds=(0,))
    cfg = cfg.replace(defences=(*cfg.defences, "drop_attention"))
    ran = ["bdvax", "discard", "random", "top_delta", "drop_attention"]
    assert [d for d in cfg.defences if cfg.applies(d, "lora")] == ran
    assert not cfg.applies("drop_attention", "full")  # a full finetune has no adapter to split
    df = Bench(cfg, base=tiny_pair, progress=False, log=lambda _: None).run()
    assert set(df.defence) == {"none", *ran}
    for name in ("bdvax", "random", "top_delta", "drop_attention"):
        row = df[df.defence == name].iloc[0]
        assert row.repair_steps == 0 and pd.isna(row.lr), name
    # rows of another implant seed (run with --seeds) are tabled by a bench whose config lacks that seed
    import shutil

    rows = Bench(cfg).rows_dir
    shutil.copytree(
        rows / "badnets-refusal-lora-knowledge-seed0", rows / "badnets-refusal-lora-knowledge-seed3"
    )
    assert set(Bench(cfg, log=lambda _: None).tables().implant_seed) == {0, 3}
    # a fresh clone: the committed table without its row cache; --adopt brings the rows back unchanged
    table = Path(cfg.out_dir) / "rows.csv"
    before = pd.read_csv(table)
    shutil.rmtree(rows)
    with pytest.raises(ValueError, match="--adopt"):
        Bench(cfg, log=lambda _: None).tables()
    with pytest.raises(ValueError, match="another bench config"):  # e.g. the flags of another table
        Bench(cfg.replace(repair=True)).adopt()
    made = table.with_name("config.json")  # which bench made the table: without it, nothing is adopted
    kept = made.read_text()
    made.unlink()
    with pytest.raises(ValueError, match=r"config\.json: no such file; .* not adopting"):
        Bench(cfg).adopt()
    made.write_text(kept)
    assert Bench(cfg).adopt() == len(before) and Bench(cfg).adopt() == 0
    assert read_json(next(rows.rglob("bdvax.json")))["adopted_from"] == str(table)
    Bench(cfg, log=lambda _: None).tables()
    after = pd.read_csv(table)
    assert set(after.adopted_from) == {str(table)}
    pd.testing.assert_frame_equal(after.drop(columns="adopted_from"), before, check_like=True)
    # a control seed the table lacks: the adopted bdvax row has no counts, so they come from its signature
    more = Bench(cfg.replace(random_seeds=(0, 1)), base=tiny_pair, progress=False, log=lambda _: None).run()
    rnd = more[(more.defence == "random") & (more.control_seed == 1)]
    assert len(rnd) == 1 and rnd.n_channels.iloc[0] == more[more.defence == "bdvax"].n_channels.iloc[0]
    assert "counts" not in read_json(next(rows.rglob("bdvax.json")))  # the adopted row is left as it was
