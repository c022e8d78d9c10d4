"""Tree utilities against the same arithmetic done on one flat vector."""

from __future__ import annotations

import pytest
import torch

import hypergrad
from hypergrad import tree

F64 = torch.float64


def make_tree(seed: int, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(2, 3, 2, generator=gen, dtype=F64).to(dtype),
        "bias": torch.randn(4, generator=gen, dtype=F64).to(dtype),
        "scalar": torch.randn((), generator=gen, dtype=F64).to(dtype),
    }


def flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in t.values()])


def test_arithmetic_matches_flat_vectors() -> None:
    a, b = make_tree(0), make_tree(1)
    torch.testing.assert_close(flat(hypergrad.tree_add(a, b)), flat(a) + flat(b))
    torch.testing.assert_close(flat(hypergrad.tree_sub(a, b)), flat(a) - flat(b))
    torch.testing.assert_close(flat(hypergrad.tree_scale(a, -2.5)), -2.5 * flat(a))
    torch.testing.assert_close(flat(hypergrad.tree_scale(a, torch.tensor(3.0))), 3.0 * flat(a))
    torch.testing.assert_close(flat(hypergrad.tree_axpy(0.3, a, b)), 0.3 * flat(a) + flat(b))
    torch.testing.assert_close(flat(hypergrad.tree_axpy(torch.tensor(-0.7, dtype=F64), a, b)), -0.7 * flat(a) + flat(b))
    torch.testing.assert_close(hypergrad.tree_vdot(a, b), flat(a) @ flat(b))
    torch.testing.assert_close(hypergrad.tree_norm(a), torch.linalg.vector_norm(flat(a)))
    z = hypergrad.tree_zeros_like(a)
    assert all(torch.equal(z[k], torch.zeros_like(a[k])) for k in a)


def test_functions_are_pure() -> None:
    a, b = make_tree(0), make_tree(1)
    a_copy = {k: v.clone() for k, v in a.items()}
    hypergrad.tree_axpy(2.0, a, b)
    hypergrad.tree_scale(a, 5.0)
    assert all(torch.equal(a[k], a_copy[k]) for k in a)


def test_single_tensor_is_a_tree() -> None:
    x, y = torch.arange(3.0, dtype=F64), torch.ones(3, dtype=F64)
    torch.testing.assert_close(hypergrad.tree_axpy(2.0, x, y), 2 * x + y)
    assert float(hypergrad.tree_vdot(x, y)) == 3.0
    v, unravel = hypergrad.tree_ravel(x.reshape(1, 3))
    assert v.shape == (3,) and unravel(v).shape == (1, 3)


def test_ravel_roundtrip_and_order() -> None:
    a = make_tree(2)
    v, unravel = hypergrad.tree_ravel(a)
    torch.testing.assert_close(v, flat(a), rtol=0, atol=0)  # key order preserved
    back = unravel(v * 2)
    assert list(back) == list(a)
    for k in a:
        assert back[k].shape == a[k].shape
        torch.testing.assert_close(back[k], 2 * a[k], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reductions_accumulate_in_float32(dtype: torch.dtype) -> None:
    """2048 ones in half precision: a half-precision sum would stall at 256 (bf16) or be inexact."""
    t = {"w": torch.ones(2048, dtype=dtype), "b": torch.full((3,), 0.5, dtype=dtype)}
    dot = hypergrad.tree_vdot(t, t)
    assert dot.dtype == torch.float32 and float(dot) == 2048.75
    assert hypergrad.tree_norm(t).dtype == torch.float32
    assert float(hypergrad.tree_norm(t)) == pytest.approx(2048.75**0.5, rel=1e-7)


def test_cast_leaves_integer_leaves_alone() -> None:
    t = {"w": torch.ones(2, dtype=F64), "steps": torch.tensor(3)}
    out = hypergrad.tree_cast(t, torch.float32)
    assert out["w"].dtype == torch.float32 and out["steps"].dtype == torch.int64


def test_all_finite() -> None:
    a = make_tree(3)
    assert bool(tree.tree_all_finite(a))
    a["bias"][2] = float("inf")
    assert not bool(tree.tree_all_finite(a))
    assert not bool(tree.tree_all_finite(torch.tensor([float("nan")])))


def test_map_over_several_trees() -> None:
    a, b = make_tree(4), make_tree(5)
    out = tree.tree_map(torch.maximum, a, b)
    torch.testing.assert_close(flat(out), torch.maximum(flat(a), flat(b)))


def test_vdot_of_empty_tree_is_an_error() -> None:
    with pytest.raises(ValueError, match="tree_vdot got an empty tree"):
        hypergrad.tree_vdot({}, {})


@pytest.mark.parametrize(
    ("candidate", "exc", "regex"),
    [
        (
            {"bias": torch.ones(4)},
            ValueError,
            r"`x` must have the same keys as `ref`: missing \['conv\.weight', 'scalar'\]",
        ),
        ([1, 2], TypeError, r"`x` must be a dict of tensors keyed like `ref`, got list"),
        (
            {"conv.weight": torch.ones(2, 3, 2), "bias": torch.ones(5), "scalar": torch.ones(())},
            ValueError,
            r"`x\['bias'\]` has shape \(5,\) but `ref\['bias'\]` has shape \(4,\)",
        ),
        (
            {"conv.weight": torch.ones(2, 3, 2), "bias": "b", "scalar": torch.ones(())},
            TypeError,
            r"`x\['bias'\]` must be a Tensor, got str",
        ),
    ],
)
def test_check_like_errors(candidate, exc: type[Exception], regex: str) -> None:
    with pytest.raises(exc, match=regex):
        tree.tree_check_like("x", candidate, make_tree(0), "ref")
    tree.tree_check_like("x", make_tree(1), make_tree(0), "ref")  # a matching tree passes
