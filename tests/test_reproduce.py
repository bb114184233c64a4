"""The reproduction runner on the tiny model: every table is written, rows resume, bad input is named."""

from __future__ import annotations

import pytest

from experiments.reproduce import (
    TABLES,
    ReproduceConfig,
    Reproduction,
    load_tables,
    pareto_figure,
    variants_figure,
)


def _config(tmp_path, **kw):
    base = dict(
        preset="t",
        targets=("badnets:refusal:lora",),
        methods=("bdvax", "finetune_only", "magnitude_prune"),
        transfer_targets=("vpi:refusal:lora",),
        n_variants=2,
        variant_counts=(1, 2),
        twin_steps=2,
        rhos=(0.5,),
        repair_steps=1,
        n_prompts=2,
        max_new_tokens=4,
        mcq_limit=4,
        n_ppl=4,
        attack_steps=2,
        runs_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "twins"),
        out_dir=str(tmp_path / "out"),
    )
    return ReproduceConfig(**(base | kw))


def test_every_table_written_and_rows_resume(tmp_path, tiny_pair):
    cfg = _config(tmp_path)
    frames = Reproduction(cfg, progress=False, base=tiny_pair, log=lambda s: None).run()
    assert set(frames) == set(TABLES)
    t2 = frames["table2_asr"]
    assert list(t2.defence) == ["none", "bdvax", "finetune_only", "magnitude_prune"]
    assert t2.asr.between(0, 1).all() and t2.false_trigger.between(0, 1).all()
    # The implant happened inside the first row; it is reported apart, not counted as that row's seconds.
    assert t2.suspicious_seconds.iloc[0] > 0 and t2.suspicious_seconds.iloc[1:].isna().all()
    assert (t2.seconds >= 0).all()
    assert list(frames["fig2_variants"].n_variants) == [1, 2]
    assert set(frames["table4_score"].score) == {"norm", "align", "combined"}
    assert sorted(frames["table10_rho"].rho_requested) == [0.5, 0.8]
    assert set(frames["table11_transfer"].defence) == {"none", "bdvax_transfer"}
    # A set implant budget names its own directory, so it never stands in for (or reuses) the recipe's model.
    assert sorted(p.name for p in (tmp_path / "runs" / "attack_matrix").iterdir()) == [
        "badnets-refusal-lora-steps2",
        "vpi-refusal-lora-steps2",
    ]
    # Tables share BD-VAX configurations: combined / N = 2 / ρ = 0.8 / Table 2's bdvax are one computed row.
    assert len(list((tmp_path / "runs" / "reproduce").glob("t-*/rows/bdvax/*.json"))) == 6
    md = (tmp_path / "out" / "tables.md").read_text()
    assert md.count("python benchmarks/reproduce.py --preset t") == len(TABLES)
    loaded = load_tables(tmp_path / "out")
    assert set(loaded) == set(TABLES)
    variants_figure(loaded["fig2_variants"]), pareto_figure(loaded["table10_rho"])

    # A second run recomputes nothing: every row comes from runs/reproduce/t-<hash>/rows.
    calls = []
    again = Reproduction(cfg, progress=False, base=tiny_pair, log=calls.append)
    again.defence_row = again.baseline_row = again._bdvax = lambda *a: pytest.fail("recomputed a cached row")
    again.run(["table2_asr"])
    assert not [c for c in calls if "ASR" in c]


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="unknown"):
        ReproduceConfig(methods=("bdvax", "nope"))
    with pytest.raises(ValueError, match="attack:task:setting"):
        ReproduceConfig(targets=("badnets-refusal",))
    from experiments.reproduce import parse_targets

    assert parse_targets(" vpi:refusal:lora,badnets:sentiment:full ") == (
        "vpi:refusal:lora",
        "badnets:sentiment:full",
    )
    with pytest.raises(ValueError, match="'badnets-refusal'"):
        parse_targets("vpi:refusal:lora,badnets-refusal")
    with pytest.raises(ValueError, match="comma list"):
        parse_targets(" , ")


def test_cli_names_an_unknown_preset(capsys):
    from bdvax_lab.cli import main

    assert main(["reproduce", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "'nope'" in err and "bench" in err and err.count("\n") == 1


def test_cli_plan_lists_rows_and_runs_nothing(tmp_path, capsys):
    from bdvax_lab.cli import main

    assert (
        main(
            [
                "reproduce",
                "--preset",
                "smoke",
                "--runs",
                str(tmp_path / "runs"),
                "--out",
                str(tmp_path / "o"),
                "--plan",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # smoke: Table 2's suspicious row + 7 defences, Table 4's norm/align, Fig. 2's N = 1,
    # Table 10's two other ρ, Table 11's other model and its transfer row;
    # shared BD-VAX configurations counted once.
    assert "0 of 15 rows cached" in out and "badnets:refusal:lora:finetune_only" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


def test_splice_markdown_keeps_prose(tmp_path):
    from experiments.reproduce import splice_markdown

    doc = tmp_path / "R.md"
    doc.write_text("intro\n<!-- t:begin -->\nold\n<!-- t:end -->\nreading\n")
    assert splice_markdown(doc, "t", "new table")
    assert doc.read_text() == "intro\n<!-- t:begin -->\nnew table\n<!-- t:end -->\nreading\n"
    assert not splice_markdown(doc, "other", "x") and "new table" in doc.read_text()


def test_changed_budget_gets_new_rows(tmp_path):
    a = Reproduction(_config(tmp_path)).rows_dir
    assert Reproduction(_config(tmp_path, repair_steps=5)).rows_dir != a
    assert Reproduction(_config(tmp_path, out_dir=str(tmp_path / "elsewhere"), rhos=(0.1,))).rows_dir == a


def test_a_slice_of_targets_fills_the_rows_a_later_whole_run_reuses(tmp_path, tiny_pair):
    """`--targets` runs part of a preset.

    A later run of the whole preset only computes what is still missing.
    """
    two = ("badnets:refusal:lora", "vpi:refusal:lora")
    cfg = _config(tmp_path, targets=two, methods=("bdvax", "finetune_only"))
    part = Reproduction(
        cfg.replace(targets=two[:1]), progress=False, base=tiny_pair, log=lambda s: None, report=cfg
    ).run(["table2_asr"])
    # The slice writes the whole preset's tables: its own rows measured, the other target's blank and counted.
    assert list(part["table2_asr"].asr.notna()) == [True] * 3 + [False] * 3
    assert list(part["table3_utility"].n_targets) == [1, 1, 1]
    assert list(part["table4_score"].asr.notna()) == [
        False,
        False,
        True,
    ]  # "combined" is Table 2's BD-VAX row
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "3 of 6 rows measured so far" in md and "1 of 3 rows measured so far" in md
    assert set(load_tables(tmp_path / "out")) == set(TABLES)
    plan = Reproduction(cfg, progress=False, base=tiny_pair).plan(["table2_asr"])
    assert len(plan) == 6 and list(plan.cached) == [True] * 3 + [False] * 3
    assert list(plan.key[3:]) == [
        "vpi:refusal:lora",
        "vpi:refusal:lora:from:vpi:refusal:lora:N2:rho0.8:combined",
        "vpi:refusal:lora:finetune_only",
    ]
    assert (plan.seconds[:3] >= 0).all() and plan.seconds[3:].isna().all()
    seen = []
    whole = Reproduction(cfg, progress=False, base=tiny_pair, log=lambda s: None)
    real = whole.defence_row
    whole.defence_row = lambda target, method: seen.append(target) or real(target, method)
    t2 = whole.run(["table2_asr"])["table2_asr"]
    assert seen == ["vpi:refusal:lora"]  # the first target's rows came from the slice
    assert list(t2.attack) == ["badnets"] * 3 + ["vpi"] * 3 and t2.asr.notna().all()
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "6 of 6" not in md and "of 6 rows measured" not in md


def test_table3_averages_only_targets_with_every_defence_measured(tmp_path):
    import pandas as pd

    r = Reproduction(_config(tmp_path, methods=("bdvax",)), log=lambda s: None)
    nan = float("nan")
    r.frames["table2_asr"] = pd.DataFrame(
        {
            "attack": ["badnets", "badnets", "vpi", "vpi"],
            "task": ["refusal"] * 4,
            "setting": ["lora"] * 4,
            "defence": ["none", "bdvax"] * 2,
            "asr": [1.0, 0.5, 0.0, nan],
            "false_trigger": [0.0, 0.1, 0.2, nan],
            "ppl": [2.0, 3.0, 9.0, nan],
        }
    )
    t3 = r.table3().set_index("defence")
    # vpi has only its "none" row: it must not pull "none" down while "bdvax" is averaged over badnets alone.
    assert list(t3.n_targets) == [1, 1] and list(t3.asr) == [1.0, 0.5] and list(t3.ppl) == [2.0, 3.0]


def test_a_slice_narrows_table11_to_its_own_targets():
    from experiments.reproduce import preset_config

    assert len(preset_config("full").transfer_targets) == 9
    part = preset_config("full", targets=("vpi:refusal:lora", "badnets:refusal:full"))
    assert part.transfer_targets == ("vpi:refusal:lora",)  # the full-setting target is not a transfer target
    assert preset_config("full", targets=("badnets:refusal:lora",)).transfer_targets == ()
    kept = preset_config("full", targets=("vpi:refusal:lora",), transfer_targets=("ctba:refusal:lora",))
    assert kept.transfer_targets == ("ctba:refusal:lora",)  # an explicit choice wins


def test_cli_targets_reach_the_config(monkeypatch):

    import experiments.reproduce as rp
    from bdvax_lab.cli import main

    got = {}
    monkeypatch.setattr(rp, "reproduce", lambda preset, **kw: got.update(kw, preset=preset) or {})
    assert (
        main(
            [
                "reproduce",
                "--preset",
                "full",
                "--targets",
                "vpi:refusal:lora, badnets:refusal:full",
                "--tables",
                "table2_asr",
            ]
        )
        == 0
    )
    assert got["targets"] == ("vpi:refusal:lora", "badnets:refusal:full") and got["preset"] == "full"


def test_a_model_implanted_again_gets_its_untreated_row_measured_again(tmp_path, tiny_pair):
    """The tables' untreated row was measured on an earlier implant; a fresh one is checked against it."""
    import shutil

    cfg = _config(tmp_path, methods=("bdvax",))
    logs = []
    Reproduction(cfg, progress=False, base=tiny_pair, log=lambda s: None).run(["table2_asr"])
    shutil.rmtree(
        tmp_path / "runs" / "attack_matrix"
    )  # a fresh machine: the rows are there, the model is not
    again = Reproduction(cfg, progress=False, base=tiny_pair, log=logs.append)
    again.suspicious("badnets:refusal:lora")
    rows = again.rows_dir
    assert (rows / "none_reimplanted" / "badnets-refusal-lora.json").is_file()
    assert any("implanted again" in line and "asr" in line for line in logs)
    again.suspicious("badnets:refusal:lora")  # opened, not implanted: nothing measured again
    assert sum("implanted again" in line for line in logs) == 1
