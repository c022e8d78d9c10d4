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


# ---------------------------------------------------------------------------------------------
# Combining trees: keys, shapes, dtypes and devices are checked, never broadcast
# ---------------------------------------------------------------------------------------------

_A = {"w": torch.ones(3, dtype=F64), "b": torch.ones(2, dtype=F64)}
_COMBINERS = {
    "tree_add": (lambda a, b: hypergrad.tree_add(a, b), "a", "b"),
    "tree_sub": (lambda a, b: hypergrad.tree_sub(a, b), "a", "b"),
    "tree_axpy": (lambda a, b: hypergrad.tree_axpy(0.5, a, b), "x", "y"),
    "tree_axpy_tensor_alpha": (lambda a, b: hypergrad.tree_axpy(torch.tensor(0.5, dtype=F64), a, b), "x", "y"),
    "tree_vdot": (lambda a, b: hypergrad.tree_vdot(a, b), "a", "b"),
}


@pytest.mark.parametrize("fn", list(_COMBINERS), ids=str)
@pytest.mark.parametrize(
    ("other", "exc", "regex"),
    [
        (
            {"w": torch.ones(3, dtype=F64)},
            ValueError,
            r"`{b}` must have the same keys as `{a}`: missing \['b'\], unexpected \[\]",
        ),
        ({**_A, "c": torch.ones(1, dtype=F64)}, ValueError, r"missing \[\], unexpected \['c'\]"),
        (
            {"w": torch.ones(1, dtype=F64), "b": torch.ones(2, dtype=F64)},
            ValueError,
            r"`{b}\['w'\]` has shape \(1,\) but `{a}\['w'\]` has shape \(3,\)",
        ),
        (
            {"w": torch.ones(3, 1, dtype=F64), "b": torch.ones(2, dtype=F64)},
            ValueError,
            r"has shape \(3, 1\) but `{a}\['w'\]` has shape \(3,\)",
        ),
        ({"w": torch.ones((), dtype=F64), "b": torch.ones(2, dtype=F64)}, ValueError, r"has shape \(\) but"),
        ({"w": "x", "b": torch.ones(2, dtype=F64)}, TypeError, r"`{b}\['w'\]` must be a Tensor, got str"),
        (torch.ones(5, dtype=F64), TypeError, r"`{b}` must be a dict of tensors keyed like `{a}`, got Tensor"),
        ([torch.ones(3)], TypeError, r"`{b}` must be a dict of tensors keyed like `{a}`, got list"),
    ],
)
def test_combining_mismatched_trees_is_refused(fn: str, other, exc: type[Exception], regex: str) -> None:
    call, a, b = _COMBINERS[fn]
    with pytest.raises(exc, match=f"{fn.split('_tensor')[0]}: .*" + regex.format(a=a, b=b)):
        call(_A, other)


@pytest.mark.parametrize("fn", ["tree_add", "tree_sub", "tree_axpy"])
def test_combining_dtypes_must_match_but_vdot_promotes(fn: str) -> None:
    call, a, b = _COMBINERS[fn]
    f32 = {k: v.float() for k, v in _A.items()}
    with pytest.raises(
        ValueError, match=rf"{fn}: `{b}\['w'\]` has dtype torch\.float32 but `{a}\['w'\]` has dtype torch\.float64"
    ):
        call(_A, f32)
    assert float(hypergrad.tree_vdot(_A, f32)) == 5.0


def test_tensor_trees_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"tree_axpy: `y` has shape \(1,\) but `x` has shape \(3,\)"):
        hypergrad.tree_axpy(1.0, torch.ones(3), torch.ones(1))
    with pytest.raises(TypeError, match=r"tree_vdot: `b` must be a Tensor like `a`, got dict"):
        hypergrad.tree_vdot(torch.ones(3), {"w": torch.ones(3)})
    with pytest.raises(TypeError, match=r"tree_map: `rest\[0\]` must be a Tensor like `tree`, got list"):
        tree.tree_map(torch.add, torch.ones(2), [1.0, 2.0])


def test_devices_are_named_when_they_differ() -> None:
    with pytest.raises(
        ValueError, match=r"tree_sub: `b\['w'\]` is on meta but `a\['w'\]` is on cpu; move it with \.to\('cpu'\)"
    ):
        hypergrad.tree_sub({"w": torch.ones(3)}, {"w": torch.ones(3, device="meta")})


@pytest.mark.parametrize(
    ("scalar", "exc", "regex"),
    [
        (torch.ones(3), ValueError, r"`alpha` must be a number or a one-element tensor, got a tensor of shape \(3,\)"),
        ("2", TypeError, r"`alpha` must be a number or a one-element tensor, got str"),
        (None, TypeError, r"got NoneType"),
        (True, TypeError, r"got bool"),
    ],
)
def test_axpy_scalar_is_checked(scalar, exc: type[Exception], regex: str) -> None:
    with pytest.raises(exc, match=r"tree_axpy: .*" + regex):
        hypergrad.tree_axpy(scalar, {"w": torch.ones(3)}, {"w": torch.ones(3)})
    with pytest.raises(exc, match=r"tree_scale: .*" + regex.replace("alpha", "s")):
        hypergrad.tree_scale({"w": torch.ones(3)}, scalar)


def test_one_element_alpha_keeps_zero_dim_leaves_zero_dim() -> None:
    """A shape-(1,) alpha used to broadcast a 0-dim leaf to shape (1,)."""
    out = hypergrad.tree_axpy(torch.tensor([2.0]), {"s": torch.tensor(1.0)}, {"s": torch.tensor(3.0)})
    assert out["s"].shape == () and float(out["s"]) == 5.0
    assert hypergrad.tree_scale({"s": torch.tensor(1.0)}, torch.tensor([4.0]))["s"].shape == ()


def test_map_checks_keys_and_types() -> None:
    with pytest.raises(ValueError, match=r"tree_map: `rest\[1\]` must have the same keys as `tree`: missing \['b'\]"):
        tree.tree_map(lambda *x: x[0], _A, _A, {"w": torch.ones(3)})
    with pytest.raises(TypeError, match=r"tree_map: `tree` must be a Tensor or a dict of tensors, got list"):
        tree.tree_map(torch.neg, [torch.ones(1)])
    with pytest.raises(TypeError, match=r"tree_map: `tree\['w'\]` must be a Tensor, got float"):
        hypergrad.tree_zeros_like({"w": 1.0})


def test_unravel_checks_the_vector_and_restores_leaf_dtypes() -> None:
    mixed = {"h": torch.ones(2, dtype=torch.float16), "d": torch.full((1, 2), 0.1, dtype=F64)}
    flat, unravel = hypergrad.tree_ravel(mixed)
    assert flat.dtype == F64 and flat.shape == (4,)
    back = unravel(flat)
    assert back["h"].dtype == torch.float16 and back["d"].dtype == F64 and torch.equal(back["d"], mixed["d"])
    with pytest.raises(ValueError, match=r"unravel: `v` must be a 1-D Tensor of length 4, got shape \(5,\)"):
        unravel(torch.zeros(5))
    with pytest.raises(ValueError, match=r"length 4, got shape \(2, 2\)"):
        unravel(torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"unravel: `v` must be a 1-D Tensor of length 3, got list"):
        hypergrad.tree_ravel(torch.ones(3))[1]([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("candidate", "kw", "exc", "regex"),
    [
        (
            {"w": torch.ones(2, dtype=torch.float32)},
            {"dtype": True},
            ValueError,
            r"O: `x\['w'\]` has dtype torch\.float32 but `ref\['w'\]` has dtype torch\.float64",
        ),
        ({"w": torch.ones(2, dtype=torch.float32)}, {}, None, None),
        (
            {"w": torch.ones(2, dtype=F64, device="meta")},
            {},
            ValueError,
            r"O: `x\['w'\]` is on meta but `ref\['w'\]` is on cpu",
        ),
        ({"w": torch.ones(2, dtype=F64, device="meta")}, {"device": False}, None, None),
        (torch.ones(2, dtype=F64), {}, TypeError, r"O: `x` must be a dict of tensors keyed like `ref`, got Tensor"),
    ],
)
def test_check_like_dtype_device_and_owner(candidate, kw: dict, exc, regex) -> None:
    ref = {"w": torch.ones(2, dtype=F64)}
    if exc is None:
        tree.tree_check_like("x", candidate, ref, "ref", owner="O", **kw)
        return
    with pytest.raises(exc, match=regex):
        tree.tree_check_like("x", candidate, ref, "ref", owner="O", **kw)
