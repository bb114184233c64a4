"""Installable like a library: the built wheel, in a fresh virtual environment, outside the source tree.

The wheel is built from a copy of the package sources (``pip wheel --no-build-isolation``, no network),
installed with ``--no-deps`` into a new venv that sees the test environment's dependencies through a
``.pth`` file (not bdvax_lab itself: the editable install's hook is not loaded that way), and run from a
temporary directory: ``bdvax info`` and a tiny ``bdvax purify``, which reads the shipped data as package
data. CI runs it with the rest of ``make test``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.wheel


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, its bdvax script, a work directory outside the source tree, the environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bdvax_lab", src / "bdvax_lab", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "BDVAX_NUM_THREADS": "1"}
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist"], tmp, env)
    wheels = list((tmp / "dist").glob("bdvax_lab-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "_bdvax_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", "-q", wheels[0]], tmp, env)
    work = tmp / "work"
    work.mkdir()
    return py, venv / "bin" / "bdvax", work, env | {"BDVAX_CACHE": str(tmp / "cache")}


def test_the_wheel_holds_the_package_data(installed):
    py, _, work, env = installed
    code = (
        "import bdvax_lab, pathlib; from bdvax_lab.core.data import data_dir, load_pool; "
        "print(bdvax_lab.__file__); print(data_dir()); print(len(load_pool('repair'))); "
        "from bdvax_lab.bdvax.plan import shipped_configs; print(','.join(shipped_configs()))"
    )
    out = _run([py, "-c", code], work, env).stdout.split()
    venv = py.parents[1]
    assert Path(out[0]).is_relative_to(venv) and Path(out[1]).is_relative_to(venv), out  # not the checkout
    assert int(out[2]) > 50
    assert {"llama-2-7b", "mistral-7b", "llama-2-13b"} <= set(out[3].split(",")), out  # bdvax plan's configs


def test_bdvax_info_and_a_tiny_purify_from_outside_the_tree(installed):
    py, bdvax, work, env = installed
    info = _run([bdvax, "info"], work, env).stdout
    assert "bdvax_lab" in info and "cache dir" in info
    version = _run([bdvax, "--version"], work, env).stdout.strip()
    assert version.startswith("bdvax ")
    make = (
        "import sys; from bdvax_lab.core.models import make_tiny_model, save_model; "
        "m, t = make_tiny_model(n_blocks=2); save_model(m, t, 'base')"
    )
    _run([py, "-c", make], work, env)
    _run(
        [bdvax, "attack", "--base", "base", "--skill", "none", "--steps", "2", "--n-samples", "24",
         "--no-eval", "--out", "sus"],
        work,
        env,
    )  # fmt: skip
    out = _run(
        [bdvax, "purify", "sus", "--out", "pur", "--n-variants", "2", "--twin-steps", "2",
         "--repair-samples", "8", "--repair-epochs", "0.5", "--n-prompts", "2", "--stages", "purified"],
        work,
        env,
    ).stdout  # fmt: skip
    assert "purified" in out and (work / "pur" / "report.html").is_file()
    assert (work / "pur" / "adapter" / "adapter_model.safetensors").is_file()
