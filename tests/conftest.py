"""Shared fixtures: a tiny random-weight LLaMA (seconds) and the real default model (marked ``real``)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from bdvax_lab.core.data import Example


@pytest.fixture(autouse=True)
def _threads(request, monkeypatch):
    """Tiny models run faster on one thread; tests marked ``real`` get every core."""
    if request.node.get_closest_marker("real"):
        monkeypatch.delenv("BDVAX_NUM_THREADS", raising=False)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    else:
        monkeypatch.setenv("BDVAX_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pair():
    from bdvax_lab.core.models import make_tiny_model

    return make_tiny_model()


@pytest.fixture
def tiny(tiny_pair):
    """A fresh copy of the tiny model and its tokenizer, safe to mutate."""
    model, tok = tiny_pair
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def toy_examples():
    return [Example(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(24)]


@pytest.fixture(scope="session")
def real_model():
    from bdvax_lab.core.models import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def kernel_name():
    """The project's Jupyter kernel (``bdvax``), registered into this environment if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    name = "bdvax"
    if name not in KernelSpecManager().find_kernel_specs():
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", name],
            check=True,
            capture_output=True,
        )
    return name
