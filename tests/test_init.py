"""SPaRLoRA initialization math on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparlora.init import (
    SparloraConfig,
    SparloraShapeError,
    available_frequencies,
    build_a,
    dft_rows,
    residualize,
    select_frequencies,
    sparlora_factors,
)


def projection(rows: torch.Tensor) -> torch.Tensor:
    return rows.T @ torch.linalg.pinv(rows @ rows.T) @ rows


@pytest.mark.parametrize("size", [7, 8, 64, 65, 560])
def test_dft_rows_orthonormal(size):
    count = min(4, available_frequencies(size))
    rows = dft_rows(size, tuple(range(1, count + 1))).double()
    assert torch.allclose(rows @ rows.T, torch.eye(2 * count, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("size", [16, 17, 512])
def test_dft_rows_are_cos_and_minus_sin(size):
    frequencies = (1, 3, 7)
    rows = dft_rows(size, frequencies)
    assert rows.shape == (6, size)
    j = torch.arange(size, dtype=torch.float64)
    for index, frequency in enumerate(frequencies):
        cos = torch.cos(2 * math.pi * frequency * j / size)
        sin = -torch.sin(2 * math.pi * frequency * j / size)
        assert torch.allclose(rows[2 * index].double(), cos / cos.norm(), atol=1e-6)
        assert torch.allclose(rows[2 * index + 1].double(), sin / sin.norm(), atol=1e-6)


def test_available_frequencies_skip_dc_and_nyquist():
    assert available_frequencies(8) == 3  # 1, 2, 3; 4 is Nyquist
    assert available_frequencies(7) == 3  # 1, 2, 3
    assert available_frequencies(2) == 0


def test_lowest_selection():
    weight = torch.randn(4, 32)
    assert select_frequencies(weight, 3, "lowest") == (1, 2, 3)


def test_energy_selection_finds_planted_frequency():
    torch.manual_seed(0)
    size = 64
    j = torch.arange(size, dtype=torch.float32)
    weight = 0.01 * torch.randn(10, size)
    weight += torch.randn(10, 1) * torch.cos(2 * math.pi * 11 * j / size + 0.7)
    weight += torch.randn(10, 1) * torch.sin(2 * math.pi * 23 * j / size)
    assert select_frequencies(weight, 2, "energy") == (11, 23)


@pytest.mark.parametrize("b_init", ["lstsq", "dft"])
def test_update_is_projection(b_init):
    torch.manual_seed(1)
    weight = torch.randn(24, 40, dtype=torch.float64).float()
    scale = 2.0
    cfg = SparloraConfig(b_init=b_init)
    a, b = sparlora_factors(weight, 8, scale, cfg)
    expected = weight.double() @ projection(a.double())
    if b_init == "dft":
        f_out = dft_rows(24, (1, 2, 3, 4)).double()
        expected = projection(f_out) @ expected
    assert torch.allclose(scale * b.double() @ a.double(), expected, atol=1e-4)


def test_zero_b_init():
    a, b = sparlora_factors(torch.randn(6, 20), 4, 2.0, SparloraConfig(b_init="zero", residual=False))
    assert torch.count_nonzero(b) == 0
    assert a.shape == (4, 20)


@pytest.mark.parametrize("d_out,d_in", [(33, 17), (32, 64), (7, 9)])
def test_residual_keeps_layer_output(d_out, d_in):
    torch.manual_seed(2)
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(5, d_in)
    scale = 1.5
    a, b = sparlora_factors(layer.weight, 4, scale, SparloraConfig())
    w_res = residualize(layer.weight, a, b, scale)
    out = x @ w_res.T + layer.bias + scale * (x @ a.T) @ b.T
    assert (out - layer(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_keeps_weight_dtype(dtype):
    weight = torch.randn(8, 16).to(dtype)
    a, b = sparlora_factors(weight, 4, 2.0, SparloraConfig())
    assert residualize(weight, a, b, 2.0).dtype == dtype


def test_dft_real_has_no_sine_rows():
    a = build_a(torch.randn(4, 32), 4, SparloraConfig(basis="dft_real", b_init="zero", residual=False))
    j = torch.arange(32, dtype=torch.float64)
    cos1 = torch.cos(2 * math.pi * j / 32)
    assert torch.allclose(a[0].double(), cos1 / cos1.norm(), atol=1e-6)
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)


def test_random_orthonormal_seeded():
    cfg = SparloraConfig(basis="random_orthonormal", seed=7)
    first = build_a(torch.randn(4, 30), 6, cfg)
    second = build_a(torch.randn(4, 30), 6, cfg)
    assert torch.equal(first, second)
    assert torch.allclose(first @ first.T, torch.eye(6), atol=1e-5)


def test_kaiming_lstsq_is_projection():
    torch.manual_seed(3)
    weight = torch.randn(12, 20)
    a, b = sparlora_factors(weight, 4, 2.0, SparloraConfig(basis="kaiming"))
    assert torch.allclose(2.0 * b.double() @ a.double(), weight.double() @ projection(a.double()), atol=1e-4)


def test_odd_rank_rejected():
    with pytest.raises(SparloraShapeError, match="even"):
        build_a(torch.randn(4, 32), 5, SparloraConfig(), where="enc.w_1 (Linear 32->4)")


def test_too_many_frequencies_rejected():
    with pytest.raises(SparloraShapeError, match=r"enc\.w_1.*size 8 has only 3"):
        build_a(torch.randn(4, 8), 8, SparloraConfig(), where="enc.w_1")


def test_invalid_option_rejected():
    with pytest.raises(ValueError, match="allowed: lowest, energy"):
        SparloraConfig(select="highest")


def test_residual_with_zero_b_rejected():
    with pytest.raises(ValueError, match="subtracts nothing"):
        SparloraConfig(b_init="zero", residual=True)


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(min_value=3, max_value=70),
    d_in=st.integers(min_value=5, max_value=70),
    half_rank=st.integers(min_value=1, max_value=4),
    select=st.sampled_from(["lowest", "energy"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_properties_over_shapes(d_out, d_in, half_rank, select, dtype):
    rank = 2 * half_rank
    weight = torch.randn(d_out, d_in, dtype=dtype)
    cfg = SparloraConfig(select=select)
    if half_rank > available_frequencies(d_in):
        with pytest.raises(SparloraShapeError):
            sparlora_factors(weight, rank, 2.0, cfg)
        return
    a, b = sparlora_factors(weight, rank, 2.0, cfg)
    assert torch.allclose(a.double() @ a.double().T, torch.eye(rank, dtype=torch.float64), atol=1e-5)
    rebuilt = residualize(weight, a, b, 2.0).double() + 2.0 * b.double() @ a.double()
    assert torch.allclose(rebuilt, weight.double(), atol=1e-4)
