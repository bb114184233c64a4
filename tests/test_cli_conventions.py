"""The ``bdvax`` command follows the ecosystem's conventions.

Every enumerated flag has its choices and ``bdvax list`` names them; flags given on the command line
override a ``--config`` file (a flag left out leaves the file's value); ``--device``, ``--dtype`` and
``--batch-size`` wherever a model runs; ``--base``, ``--chat-template`` and ``--clean-data`` wherever a
suspicious model is opened or defended; ``bdvax --version``; purify's defaults follow attack's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from bdvax_lab.cli import LISTS, _given_options, build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(cmd: str) -> dict[str, argparse.Action]:
    return {o: a for a in _subparsers()[cmd]._actions for o in a.option_strings}


#: flags whose value is one of a known set (or a comma list of one), wherever they appear
ENUMERATED = {
    "--attack",
    "--task",
    "--setting",
    "--skill",
    "--family",
    "--scope",
    "--score",
    "--init",
    "--method",
    "--mode",
    "--dtype",
    "--preset",
    "--stages",
    "--utility",
    "--probes",
    "--checks",
    "--tables",
}


def test_every_enumerated_flag_has_its_choices():
    missing = []
    for cmd, sub in _subparsers().items():
        for action in sub._actions:
            for opt in set(action.option_strings) & ENUMERATED:
                comma = getattr(action.type, "__name__", "") == "comma list"
                if not action.choices and not comma:
                    missing.append(f"{cmd} {opt}")
    assert not missing, missing


@pytest.mark.parametrize(
    "cmd", ["attack", "evaluate", "sanity", "probe", "variants", "signature", "purify", "defend", "chat"]
)
def test_work_commands_take_device_dtype_and_base(cmd):
    opts = _options(cmd)
    assert {"--device", "--dtype", "--base", "--chat-template"} <= set(opts), cmd
    if cmd in ("attack", "evaluate", "purify", "defend"):
        assert "--batch-size" in opts
    if cmd in ("purify", "defend", "signature", "variants"):
        assert "--clean-data" in opts


def test_bad_enumerated_values_are_one_line_usage_errors(capsys):
    for argv in (
        ["purify", "x", "--out", "y", "--family", "fear"],
        ["defend", "x", "--method", "nope"],
        ["evaluate", "x", "--utility", "ppl,vibes"],
        ["attack", "--out", "y", "--task", "dance"],
        ["purify", "x", "--out", "y", "--stages", "before"],
        ["export", "x", "--out", "y", "--dtype", "int3"],
        ["chat", "hi", "--device", "tpu"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "invalid" in err or "choose" in err, err
        assert argv[-1] in err


@pytest.mark.parametrize("what", LISTS)
def test_bdvax_list(what, capsys):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    expected = {
        "attacks": "badnets",
        "tasks": "refusal",
        "families": "code_injection",
        "defences": "fine_prune",
        "skills": "knowledge",
        "architectures": "phi3",
        "chat-templates": "gemma",
    }[what]
    assert expected in out


def test_lists_match_what_the_flags_accept():
    from bdvax_lab.baselines.registry import BUILTIN_DEFENCES, defences
    from bdvax_lab.bdvax.config import DEFAULT_FAMILY, resolve_family
    from bdvax_lab.cli import DEFAULT_TASK, PRESETS, TABLES
    from bdvax_lab.threat.attacks import resolve_task

    assert set(defences()) == set(BUILTIN_DEFENCES) and len(BUILTIN_DEFENCES) == len(set(BUILTIN_DEFENCES))
    # purify fears, by default, the family of attack's default behaviour: no silent mismatch
    assert resolve_family(resolve_task(DEFAULT_TASK).judge) == DEFAULT_FAMILY
    assert _options("purify")["--family"].default == DEFAULT_FAMILY
    assert _options("attack")["--task"].default == DEFAULT_TASK
    import experiments.reproduce as rp

    assert set(PRESETS) == set(rp.PRESETS) | {"bench"} and TABLES == rp.TABLES


def test_version_is_the_package_version(capsys):
    import bdvax_lab

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bdvax {bdvax_lab.__version__}"


def test_given_options_are_the_typed_ones():
    assert _given_options(["purify", "s", "--out", "o", "--rho", "0.2"]) >= {"rho", "out"}
    assert "family" not in _given_options(["purify", "s", "--out", "o"])


def _ns(argv):
    ns = build_parser().parse_args(argv)
    ns._explicit = _given_options(argv)
    return ns


def test_flags_override_a_signature_config_file(tmp_path):
    from bdvax_lab.cli import _signature_config

    cfg = tmp_path / "sig.yaml"
    cfg.write_text("family: insult\nn_variants: 3\nrho: 0.1\nlam: 0.5\n")
    got = _signature_config(_ns(["signature", "s", "--out", "o", "--config", str(cfg)]), "lora")
    assert (got.family, got.n_variants, got.rho, got.lam) == ("insult", 3, 0.1, 0.5)  # the file, untouched
    argv = ["signature", "s", "--out", "o", "--config", str(cfg), "--rho", "0.3", "--twin-steps", "7"]
    got = _signature_config(_ns(argv), "lora")
    assert (got.family, got.n_variants, got.rho, got.twin_train.steps) == ("insult", 3, 0.3, 7)
    got = _signature_config(_ns(["signature", "s", "--out", "o", "--family", "code"]), "lora")
    assert got.family == "code_injection" and got.n_variants == 6  # no file: the flags and their defaults


def test_flags_override_a_purify_config_file(tmp_path):
    from bdvax_lab.cli import _purify_config

    cfg = tmp_path / "pur.json"
    body = {
        "signature": {"family": "insult", "rho": 0.2},
        "repair": {"n_samples": 80, "epochs": 2.0},
        "eval": {"n_prompts": 7},
        "evaluate": ["purified"],
    }
    cfg.write_text(json.dumps(body))
    got = _purify_config(_ns(["purify", "s", "--out", "o", "--config", str(cfg)]), "lora")
    assert (got.repair.n_samples, got.repair.epochs, got.eval.n_prompts) == (80, 2.0, 7)
    assert got.evaluate == ("purified",) and got.signature.family == "insult" and got.signature.rho == 0.2
    argv = ["purify", "s", "--out", "o", "--config", str(cfg), "--repair-epochs", "3", "--stages", "none"]
    got = _purify_config(_ns(argv + ["--family", "refusal", "--batch-size", "9"]), "lora")
    assert (got.repair.n_samples, got.repair.epochs) == (80, 3.0)
    assert (got.eval.n_prompts, got.eval.batch_size) == (7, 9)
    assert got.evaluate == () and got.signature.family == "refusal" and got.signature.rho == 0.2
    assert got.finetune is True
    assert _purify_config(_ns(argv + ["--no-repair"]), "lora").finetune is False


def test_purify_reads_rho_as_purify_does(tmp_path):
    """No ρ anywhere → calibrate; an explicit ``rho: null`` → the paper's ρ, in the CLI as in purify()."""
    from bdvax_lab.bdvax.config import AUTO_RHO, PurifyConfig, purify_signature
    from bdvax_lab.cli import _purify_config

    assert _purify_config(_ns(["purify", "s", "--out", "o"]), "lora").signature.rho == AUTO_RHO
    cases = [
        ({"eval": {"n_prompts": 7}}, AUTO_RHO),  # a PurifyConfig file with no signature section
        ({"signature": {"family": "insult"}}, AUTO_RHO),
        ({"signature": {"family": "insult", "rho": None}}, None),
        ({"family": "insult"}, AUTO_RHO),  # a bare SignatureConfig file
        ({"family": "insult", "rho": None}, None),
    ]
    for i, (body, want) in enumerate(cases):
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(body))
        got = _purify_config(_ns(["purify", "s", "--out", "o", "--config", str(path)]), "lora").signature
        bare = "family" in body  # a bare SignatureConfig file; otherwise a PurifyConfig file
        api = purify_signature(body if bare else PurifyConfig.from_file(path).signature)
        assert got.rho == api.rho == want, body
    got = _purify_config(_ns(["purify", "s", "--out", "o", "--config", str(path), "--rho", "0.3"]), "lora")
    assert got.signature.rho == 0.3  # the flag is written over the file
    path.write_text(json.dumps({"rho": 2.0}))
    with pytest.raises(ValueError, match=path.name):
        _purify_config(_ns(["purify", "s", "--out", "o", "--config", str(path)]), "lora")


def test_a_bad_config_value_names_the_file(tmp_path, capsys):
    from bdvax_lab.cli import _signature_config

    cfg = tmp_path / "sig.yaml"
    cfg.write_text("rho: 2.0\n")
    with pytest.raises(ValueError, match="sig.yaml"):
        _signature_config(_ns(["signature", "s", "--out", "o", "--config", str(cfg), "--heads", "1"]), "lora")


def test_help_and_version_import_no_torch():
    code = (
        "import sys; from bdvax_lab.cli import main; main(['--version']); "
        "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
