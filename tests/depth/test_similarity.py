"""Linear CKA properties, agreement with the Gram form, streaming, and rank aggregation."""

from __future__ import annotations

import pytest
import torch

from amp_prune.depth.similarity import StreamingCKA, angular_distance, block_influence, cka_gram, linear_cka, rank_sum


def data(n=300, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), g


def test_self_similarity_is_one():
    x, _ = data()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, g = data()
    y = x @ torch.randn(16, 12, generator=g, dtype=torch.float64) + 0.5 * torch.randn(300, 12, generator=g,
                                                                                         dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert linear_cka(x, y @ q) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x, 7.5 * y) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x, y + 3.0) == pytest.approx(base, rel=1e-9)  # centring
    # but not invariant to an anisotropic scaling
    assert linear_cka(x, y * torch.linspace(0.1, 10, 12, dtype=torch.float64)) != pytest.approx(base, rel=1e-3)


def test_agrees_with_gram_matrix_formula():
    x, g = data(n=120, d=10)
    y = torch.tanh(x @ torch.randn(10, 20, generator=g, dtype=torch.float64))
    assert linear_cka(x, y) == pytest.approx(cka_gram(x, y), rel=1e-9)
    z = torch.randn(120, 5, generator=g, dtype=torch.float64)
    assert linear_cka(x, z) == pytest.approx(cka_gram(x, z), rel=1e-9)


def test_streaming_equals_one_shot_and_is_stable_at_scale():
    x, g = data(n=1000, d=8)
    y = x[:, :6] * 2 + torch.randn(1000, 6, generator=g, dtype=torch.float64)
    acc = StreamingCKA()
    for s in range(0, 1000, 137):
        acc.update(x[s:s + 137].float(), y[s:s + 137].float())
    assert acc.value() == pytest.approx(linear_cka(x.float(), y.float()), rel=1e-9)
    # 100k tokens with a large common offset: raw-sum accumulation in fp64 stays accurate
    big = torch.randn(100_000, 32, generator=g) + 50.0
    assert linear_cka(big, big * 3 + 1, chunk=8192) == pytest.approx(1.0, abs=1e-9)


def test_block_distances():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert angular_distance(a, b).tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
    assert block_influence(a, b).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_rank_sum():
    # candidate 1 is best by CKA (high) and by BI (low); candidate 0 is worst for both
    got = rank_sum({"cka": [0.1, 0.9, 0.5], "bi": [0.8, 0.1, 0.5]}, {"cka": True, "bi": False})
    assert got == [4.0, 0.0, 2.0]
    assert rank_sum({"m": [1.0, 1.0, 0.0]}, {"m": False}) == [1.5, 1.5, 0.0]
