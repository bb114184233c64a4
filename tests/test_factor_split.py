"""The twin-difference split by factor (analysis.factor_split), on hand-made LoRA factors."""

from __future__ import annotations

import pytest
import torch

from bdvax_lab.analysis.factor_split import split_norms, twin_factors
from bdvax_lab.weights.delta_io import Factors

OUT, IN, R, SCALE = 6, 5, 2, 2.0


def differential(B_p, A_p, B_c, A_c) -> Factors:
    """What ``FactoredDelta.__sub__`` stores for a twin pair: parts (+poisoned, −clean), scale kept apart."""
    return Factors(torch.cat([B_p, B_c], 1), torch.cat([A_p, A_c], 0), ((R, SCALE, 1), (R, SCALE, -1)))


def factors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, R, generator=g, dtype=torch.float64), torch.randn(
        R, IN, generator=g, dtype=torch.float64
    )


def test_twin_factors_recover_the_dense_difference():
    (B_p, A_p), (B_c, A_c) = factors(0), factors(1)
    bp, ap, bc, ac = twin_factors(differential(B_p, A_p, B_c, A_c))
    want = SCALE * (B_p @ A_p - B_c @ A_c)
    assert torch.allclose(bp @ ap - bc @ ac, want)


def test_a_change_of_the_shared_factor_is_shared_and_follows_each_rows_weight():
    B, A_c = factors(2)
    B[3] *= 3.0  # a channel with three times the weight in the suspicious update
    A_p = A_c + 0.1 * factors(3)[1]
    own, shared = split_norms(differential(B, A_p, B, A_c), "up")  # channels = output rows
    assert torch.allclose(own, torch.zeros(OUT, dtype=torch.float64))
    dense = SCALE * B @ (A_p - A_c)
    assert torch.allclose(shared, dense.norm(dim=1))
    base = B.clone()
    base[3] /= 3.0
    assert shared[3] == pytest.approx(3.0 * (SCALE * base[3] @ (A_p - A_c)).norm().item())


def test_a_change_of_one_rows_own_slice_is_its_own_and_the_roles_swap_for_columns():
    B_c, A = factors(4)
    B_p = B_c.clone()
    B_p[1] += 0.5  # only channel 1 moves its own row of B
    own, shared = split_norms(differential(B_p, A, B_c, A), "gate")
    assert torch.allclose(shared, torch.zeros(OUT, dtype=torch.float64))
    assert own.argmax().item() == 1 and torch.count_nonzero(own).item() == 1
    # down: channels are input columns; the same change of B is shared by every column (∝ that column of A)
    own_d, shared_d = split_norms(differential(B_p, A, B_c, A), "down")
    assert torch.allclose(own_d, torch.zeros(IN, dtype=torch.float64))
    assert torch.allclose(shared_d, (SCALE * (B_p - B_c) @ A).norm(dim=0))


def test_split_refuses_what_is_not_a_twin_differential():
    B, A = factors(5)
    with pytest.raises(ValueError, match="two parts"):
        split_norms(Factors(B, A, ((R, 1.0, 1),)), "up")
    with pytest.raises(ValueError, match="no channel axis"):
        split_norms(differential(B, A, B, A), "q")
