"""The benchmark scripts start from any working directory: their imports of ``experiments/`` (which lives in
the checkout, not in the installed package) resolve, and a bad argument gets argparse's one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("reproduce.py", ["--preset", "nosuch"], "unknown preset 'nosuch'"),
        ("bench.py", ["--seeds", "one"], "--seeds 'one': expected a comma list of integers"),
        ("bench.py", ["--defences", "bdvax,nosuch"], "has unknown ['nosuch']"),
    ],
)
def test_benchmark_scripts_import_from_anywhere(tmp_path, script, args, expect):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--runs", str(tmp_path)]
        if script == "bench.py"
        else [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "ModuleNotFoundError" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 2 and expect in out.stderr, out.stderr[-2000:]


def test_machine_speed_times_the_pipeline_path():
    """The step ``bdvax plan`` is fed: the reference workload on the fused, shared-prefix path."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "machine_speed.py"), "--steps", "2", "--path", "pipeline"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rec) == {"pipeline_step_s", "steps", "measured_in_s"} and rec["steps"] == 2
    assert 0 < rec["pipeline_step_s"] < rec["measured_in_s"]
