"""Arithmetic on parameter trees.

A *tree* here is a flat ``dict[str, Tensor]`` (the shape of ``dict(module.named_parameters())``) or a
single tensor. Every function is pure: it returns new tensors and never touches autograd state.
Reductions (:func:`tree_vdot`, :func:`tree_norm`) accumulate in at least float32, so bf16 and fp16
trees get fp32 solver scalars, and return 0-dim tensors: reading them with ``float()`` is the only
host-device synchronisation, and it is the caller's choice.
"""

from __future__ import annotations

from typing import Callable, Mapping, cast

import torch
from torch import Tensor

from ._typing import TreeOrTensor

__all__ = [
    "tree_map",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_vdot",
    "tree_norm",
    "tree_zeros_like",
    "tree_cast",
    "tree_all_finite",
    "tree_ravel",
    "tree_check_like",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def tree_map(fn: Callable[..., Tensor], tree: TreeOrTensor, *rest: TreeOrTensor) -> TreeOrTensor:
    """Apply ``fn`` leaf-wise to one or more trees with the same keys.

    Args:
        fn: ``fn(leaf, *other_leaves) -> Tensor``.
        tree: a dict of tensors or a single tensor.
        *rest: further trees keyed like ``tree`` (their leaves are passed to ``fn`` in order); a
            tree with other keys, or a dict where ``tree`` is a tensor, is a ``ValueError``/``TypeError``.

    Returns:
        A new tree keyed like ``tree`` (a tensor if ``tree`` is one).

    Example:
        >>> import torch
        >>> tree_map(torch.neg, {"w": torch.ones(2)})["w"]
        tensor([-1., -1.])
    """
    if isinstance(tree, Tensor):
        for i, r in enumerate(rest):
            if not isinstance(r, Tensor):
                raise TypeError(f"tree_map: `rest[{i}]` must be a Tensor like `tree`, got {type(r).__name__}.")
        return fn(tree, *rest)
    _check_tree("tree_map", "tree", tree)
    for i, r in enumerate(rest):
        _check_keys("tree_map", f"rest[{i}]", r, "tree", tree)
    others = [cast(Mapping[str, Tensor], r) for r in rest]
    return {k: fn(v, *(r[k] for r in others)) for k, v in tree.items()}


def tree_add(a: TreeOrTensor, b: TreeOrTensor) -> TreeOrTensor:
    """Leaf-wise ``a + b``.

    Args:
        a: a tree (or tensor).
        b: a tree with the keys, shapes and dtypes of ``a`` (no broadcasting).

    Returns:
        A new tree keyed like ``a``.

    Raises:
        TypeError: one is a tensor and the other a dict, or a leaf is not a tensor.
        ValueError: keys, shapes, dtypes or devices differ; the message names the leaf.

    Example:
        >>> import torch
        >>> tree_add({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """
    return _combine("tree_add", torch.add, a, "a", b, "b")


def tree_sub(a: TreeOrTensor, b: TreeOrTensor) -> TreeOrTensor:
    """Leaf-wise ``a - b``.

    Args:
        a: a tree (or tensor).
        b: a tree with the keys, shapes and dtypes of ``a`` (no broadcasting).

    Returns:
        A new tree keyed like ``a``.

    Raises:
        TypeError: one is a tensor and the other a dict, or a leaf is not a tensor.
        ValueError: keys, shapes, dtypes or devices differ; the message names the leaf.

    Example:
        >>> import torch
        >>> tree_sub({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([0., 0.])
    """
    return _combine("tree_sub", torch.sub, a, "a", b, "b")


def tree_scale(a: TreeOrTensor, s: float | Tensor) -> TreeOrTensor:
    """Leaf-wise ``s * a``; ``s`` may be a 0-dim tensor (no host sync).

    Args:
        a: a tree (or tensor).
        s: a Python number or a one-element tensor (cast to each leaf's dtype); a tensor with more
            elements is refused (it would broadcast).

    Returns:
        A new tree keyed like ``a``.

    Example:
        >>> import torch
        >>> tree_scale({"w": torch.ones(2)}, torch.tensor(3.0))["w"]
        tensor([3., 3.])
    """
    _check_scalar("tree_scale", "s", s)
    if isinstance(s, Tensor):
        s0 = s.reshape(())
        return tree_map(lambda x: x * s0.to(x.dtype), a)
    return tree_map(lambda x: x * s, a)


def tree_axpy(alpha: float | Tensor, x: TreeOrTensor, y: TreeOrTensor) -> TreeOrTensor:
    """Leaf-wise ``alpha * x + y``; ``alpha`` may be a 0-dim tensor (no host sync).

    Args:
        alpha: a Python number or a one-element tensor.
        x: a tree (or tensor).
        y: a tree with the keys, shapes and dtypes of ``x`` (no broadcasting).

    Returns:
        A new tree keyed like ``x``.

    Raises:
        TypeError: ``alpha`` is not a number or one-element tensor; one tree is a tensor and the
            other a dict; a leaf is not a tensor.
        ValueError: keys, shapes, dtypes or devices differ; the message names the leaf.

    Example:
        >>> import torch
        >>> tree_axpy(2.0, {"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([3., 3.])
    """
    _check_scalar("tree_axpy", "alpha", alpha)
    if isinstance(alpha, Tensor):
        a = alpha.reshape(())
        return _combine("tree_axpy", lambda u, v: torch.addcmul(v, a.to(u.dtype), u), x, "x", y, "y")
    return _combine("tree_axpy", lambda u, v: torch.add(v, u, alpha=alpha), x, "x", y, "y")


def tree_vdot(a: TreeOrTensor, b: TreeOrTensor) -> Tensor:
    """Inner product :math:`\\sum_k \\langle a_k, b_k \\rangle` as a 0-dim tensor (>= float32).

    Args:
        a: a non-empty tree (or tensor).
        b: a tree with the keys and shapes of ``a`` (dtypes may differ: they are promoted).

    Returns:
        A 0-dim tensor in ``a``'s dtype promoted to at least float32.

    Raises:
        TypeError: one is a tensor and the other a dict, or a leaf is not a tensor.
        ValueError: ``a`` is empty, or keys, shapes or devices differ.

    Example:
        >>> import torch
        >>> tree_vdot({"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)})
        tensor(6.)
    """
    # --- FSDP2 block (helper FSDP): DTensor leaves sum their local dots and all_reduce once. ---
    if _is_dtensor_tree(a):
        from .fsdp.vectors import sharded_vdot

        return sharded_vdot(a, b)
    # --- end FSDP2 block ---
    if isinstance(a, Mapping) and len(a) == 0:
        raise ValueError("tree_vdot got an empty tree `a`: pass at least one tensor.")
    terms = _combine("tree_vdot", _dot, a, "a", b, "b", same_dtype=False)
    if isinstance(terms, Tensor):
        return terms
    total = None
    for term in terms.values():
        total = term if total is None else total + term
    assert total is not None  # a is non-empty
    return total


def _is_dtensor_tree(a: TreeOrTensor) -> bool:
    # FSDP2 block (helper FSDP): a DTensor leaf means the tree is sharded over ranks.
    # Any leaf: a mixed tree (sharded and replicated leaves) is reduced over ranks too.
    if isinstance(a, Tensor):
        return type(a).__name__ == "DTensor"
    return any(type(v).__name__ == "DTensor" for v in a.values())


def _dot(u: Tensor, v: Tensor) -> Tensor:
    # One fused kernel (torch.dot) per leaf; half-precision leaves are widened to float32 first.
    dt = _acc_dtype(torch.promote_types(u.dtype, v.dtype))
    if u.dtype != dt or v.dtype != dt:
        u, v = u.to(dt), v.to(dt)
    return torch.dot(u.reshape(-1), v.reshape(-1))


def tree_norm(a: TreeOrTensor) -> Tensor:
    r"""Euclidean norm of the whole tree, :math:`\sqrt{\sum_k \|a_k\|^2}`, as a 0-dim tensor (>= float32).

    Args:
        a: a non-empty tree (or tensor).

    Returns:
        A 0-dim tensor (at least float32).

    Example:
        >>> import torch
        >>> tree_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    return torch.sqrt(tree_vdot(a, a))


def tree_zeros_like(a: TreeOrTensor) -> TreeOrTensor:
    """A tree of zeros shaped like ``a``.

    Args:
        a: a tree (or tensor).

    Returns:
        A new tree with the keys, shapes, dtypes and devices of ``a``, filled with zeros.

    Example:
        >>> import torch
        >>> tree_zeros_like({"w": torch.ones(2, 1)})["w"].shape
        torch.Size([2, 1])
    """
    return tree_map(torch.zeros_like, a)


def tree_cast(a: TreeOrTensor, dtype: torch.dtype) -> TreeOrTensor:
    """Cast every floating leaf to ``dtype`` (integer leaves are left alone).

    Args:
        a: a tree (or tensor).
        dtype: the target floating dtype, e.g. ``torch.float64`` (anything else is a ``TypeError``).

    Returns:
        A new tree keyed like ``a``.

    Example:
        >>> import torch
        >>> t = tree_cast({"w": torch.ones(1), "n": torch.ones(1, dtype=torch.long)}, torch.float64)
        >>> t["w"].dtype, t["n"].dtype
        (torch.float64, torch.int64)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"tree_cast: `dtype` must be a floating torch.dtype such as torch.float64, got {dtype!r}"
            + (" (an integer dtype would truncate every value)." if isinstance(dtype, torch.dtype) else ".")
        )
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, a)


def tree_all_finite(a: TreeOrTensor) -> Tensor:
    """Whether every entry of every leaf is finite, as a 0-dim bool tensor (no host sync).

    Args:
        a: a tree (or tensor).

    Returns:
        A 0-dim ``torch.bool`` tensor (``True`` for an empty tree).

    Example:
        >>> import torch
        >>> tree_all_finite({"w": torch.tensor([1.0, float("nan")])})
        tensor(False)
    """
    leaves = [a] if isinstance(a, Tensor) else list(a.values())
    flags = [torch.isfinite(x).all() for x in leaves]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def tree_ravel(a: TreeOrTensor) -> tuple[Tensor, Callable[[Tensor], TreeOrTensor]]:
    """Flatten a tree into one vector and return it with the inverse map.

    Args:
        a: a tree (or tensor); leaves are concatenated in key order.

    Returns:
        ``(flat, unravel)``: a 1-D tensor of length :math:`\\sum_k` ``a[k].numel()`` (leaves of
        different dtypes are promoted to a common one) and a function mapping such a vector back to
        a tree shaped like ``a``, each leaf in its original dtype; a vector of another length or
        shape is a ``ValueError``.

    Example:
        >>> import torch
        >>> flat, unravel = tree_ravel({"a": torch.ones(2), "b": torch.zeros(1, 2)})
        >>> flat
        tensor([1., 1., 0., 0.])
        >>> unravel(flat)["b"].shape
        torch.Size([1, 2])
    """
    if isinstance(a, Tensor):
        shape, n = a.shape, a.numel()

        def unravel_tensor(v: Tensor) -> Tensor:
            _check_flat(v, n)
            return v.reshape(shape)

        return a.reshape(-1), unravel_tensor
    _check_tree("tree_ravel", "a", a)
    keys = list(a.keys())
    shapes = [a[k].shape for k in keys]
    sizes = [a[k].numel() for k in keys]
    dtypes = [a[k].dtype for k in keys]
    mixed = len(set(dtypes)) > 1
    flat = torch.cat([a[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)
    total = sum(sizes)

    def unravel(v: Tensor) -> dict[str, Tensor]:
        _check_flat(v, total)
        parts = torch.split(v, sizes)
        if mixed:  # torch.cat promoted the leaves; give each its own dtype back
            return {k: p.reshape(s).to(d) for k, p, s, d in zip(keys, parts, shapes, dtypes)}
        return {k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}

    return flat, unravel


def tree_check_like(
    name: str,
    tree: object,
    reference: TreeOrTensor,
    ref_name: str,
    *,
    dtype: bool = False,
    device: bool = True,
    owner: str | None = None,
) -> None:
    """Raise a clear error unless ``tree`` has the keys and shapes (and devices, dtypes) of ``reference``.

    Args:
        name: how ``tree`` is called in the error message (e.g. ``"x0"``).
        tree: the tree to check.
        reference: the tree (or tensor) ``tree`` must match.
        ref_name: how ``reference`` is called in the error message.
        dtype: also require the same dtype leaf by leaf.
        device: also require the same device leaf by leaf (default).
        owner: prefix of the message (e.g. ``"CG"``).

    Raises:
        TypeError: ``tree`` is not a dict of tensors (or not a tensor, for a tensor ``reference``).
        ValueError: keys, shapes, dtypes or devices differ; the message lists the missing/unexpected
            keys or the first leaf that differs.

    Example:
        >>> import torch
        >>> tree_check_like("x0", {"w": torch.zeros(3)}, {"w": torch.zeros(2)}, "b")
        Traceback (most recent call last):
        ...
        ValueError: `x0['w']` has shape (3,) but `b['w']` has shape (2,); they must match.
    """
    prefix = f"{owner}: " if owner else ""
    if isinstance(reference, Tensor):
        if not isinstance(tree, Tensor):
            raise TypeError(f"{prefix}`{name}` must be a Tensor like `{ref_name}`, got {type(tree).__name__}.")
        _check_leaf(prefix, f"`{name}`", tree, f"`{ref_name}`", reference, dtype=dtype, device=device)
        return
    if isinstance(tree, Tensor) or not isinstance(tree, Mapping):
        raise TypeError(
            f"{prefix}`{name}` must be a dict of tensors keyed like `{ref_name}`, got {type(tree).__name__}."
        )
    if tree.keys() != reference.keys():
        missing = sorted(map(str, set(reference) - set(tree)))
        extra = sorted(map(str, set(tree) - set(reference)))
        raise ValueError(
            f"{prefix}`{name}` must have the same keys as `{ref_name}`: missing {missing}, unexpected {extra}."
        )
    for k, ref in reference.items():
        v = tree[k]
        if not isinstance(v, Tensor):
            raise TypeError(f"{prefix}`{name}[{k!r}]` must be a Tensor, got {type(v).__name__}.")
        _check_leaf(prefix, f"`{name}[{k!r}]`", v, f"`{ref_name}[{k!r}]`", ref, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Private checks. The arithmetic ones run on every call of a solver loop, so they compare keys,
# shapes and dtypes only (Python-level comparisons, no device work); devices are diagnosed only
# when torch itself fails.
# ------------------------------------------------------------------------------------------------


def _check_leaf(prefix: str, name: str, v: Tensor, ref_name: str, ref: Tensor, *, dtype: bool, device: bool) -> None:
    if v.shape != ref.shape:
        raise ValueError(
            f"{prefix}{name} has shape {tuple(v.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match."
        )
    if dtype and v.dtype != ref.dtype:
        raise ValueError(
            f"{prefix}{name} has dtype {v.dtype} but {ref_name} has dtype {ref.dtype}; they must match "
            f"(cast it with .to({ref.dtype}))."
        )
    if device and v.device != ref.device:
        raise ValueError(
            f"{prefix}{name} is on {v.device} but {ref_name} is on {ref.device}; move it with .to({str(ref.device)!r})."
        )


def _check_tree(fn: str, name: str, tree: object) -> None:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{fn}: `{name}` must be a Tensor or a dict of tensors, got {type(tree).__name__}.")
    for k, v in tree.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{fn}: `{name}[{k!r}]` must be a Tensor, got {type(v).__name__}.")


def _check_keys(fn: str, name: str, tree: object, ref_name: str, ref: Mapping[str, Tensor]) -> None:
    if isinstance(tree, Tensor) or not isinstance(tree, Mapping):
        raise TypeError(f"{fn}: `{name}` must be a dict of tensors keyed like `{ref_name}`, got {type(tree).__name__}.")
    if tree.keys() != ref.keys():
        missing = sorted(map(str, set(ref) - set(tree)))
        extra = sorted(map(str, set(tree) - set(ref)))
        raise ValueError(
            f"{fn}: `{name}` must have the same keys as `{ref_name}`: missing {missing}, unexpected {extra}."
        )


def _check_scalar(fn: str, name: str, s: object) -> None:
    if isinstance(s, Tensor):
        if s.numel() != 1:
            raise ValueError(
                f"{fn}: `{name}` must be a number or a one-element tensor, got a tensor of shape {tuple(s.shape)} "
                "(it would broadcast over every leaf); use tree_map for leaf-wise products."
            )
    elif isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"{fn}: `{name}` must be a number or a one-element tensor, got {type(s).__name__}.")


def _combine(
    fn: str,
    op: Callable[[Tensor, Tensor], Tensor],
    a: object,
    a_name: str,
    b: object,
    b_name: str,
    *,
    same_dtype: bool = True,
) -> TreeOrTensor:
    """``op`` leaf-wise on two trees that must have the same keys, shapes (and dtypes).

    One pass over the leaves on the happy path (a shape and a dtype comparison per leaf, no device
    query); anything unusual is diagnosed leaf by leaf in :func:`_diagnose` for a clear message.
    """
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor):
            raise TypeError(f"{fn}: `{b_name}` must be a Tensor like `{a_name}`, got {type(b).__name__}.")
        if b.shape != a.shape or (same_dtype and b.dtype != a.dtype):
            _diagnose(fn, {None: a}, a_name, {None: b}, b_name, same_dtype)
        try:
            return op(a, b)
        except RuntimeError:
            _diagnose(fn, {None: a}, a_name, {None: b}, b_name, same_dtype)
            raise
    if not isinstance(a, Mapping):
        raise TypeError(f"{fn}: `{a_name}` must be a Tensor or a dict of tensors, got {type(a).__name__}.")
    am = cast(Mapping[str, Tensor], a)
    _check_keys(fn, b_name, b, a_name, am)
    bm = cast(Mapping[str, Tensor], b)
    out: dict[str, Tensor] = {}
    try:
        for k, u in am.items():
            v = bm[k]
            if v.shape != u.shape or (same_dtype and v.dtype != u.dtype):
                break
            out[k] = op(u, v)
        else:
            return out
    except (AttributeError, RuntimeError, TypeError):
        _diagnose(fn, am, a_name, bm, b_name, same_dtype)
        raise
    _diagnose(fn, am, a_name, bm, b_name, same_dtype)
    raise AssertionError("unreachable")  # pragma: no cover - _diagnose raised


def _diagnose(fn: str, a: Mapping, a_name: str, b: Mapping, b_name: str, same_dtype: bool) -> None:
    """Raise the clear error for the first leaf pair that is not a tensor or differs; return if none does."""
    for k, u in a.items():
        v = b[k]
        where = "" if k is None else f"[{k!r}]"
        for leaf, name in ((u, a_name), (v, b_name)):
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{fn}: `{name}{where}` must be a Tensor, got {type(leaf).__name__}.")
        _check_leaf(f"{fn}: ", f"`{b_name}{where}`", v, f"`{a_name}{where}`", u, dtype=same_dtype, device=True)


def _check_flat(v: object, n: int) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"unravel: `v` must be a 1-D Tensor of length {n}, got {type(v).__name__}.")
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"unravel: `v` must be a 1-D Tensor of length {n}, got shape {tuple(v.shape)}.")
