"""Test helpers shared by several test modules.

Snapshot a model's parameters, compare two snapshots bit-exactly.
"""

from __future__ import annotations

import torch


def params(model) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
