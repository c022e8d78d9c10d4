"""Arithmetic on parameter trees.

A *tree* here is a flat ``dict[str, Tensor]`` (the shape of ``dict(module.named_parameters())``) or a
single tensor. Every function is pure: it returns new tensors and never touches autograd state.
Reductions (:func:`tree_vdot`, :func:`tree_norm`) accumulate in at least float32, so bf16 and fp16
trees get fp32 solver scalars, and return 0-dim tensors: reading them with ``float()`` is the only
host-device synchronisation, and it is the caller's choice.
"""

from __future__ import annotations

from typing import Callable, Mapping

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
        *rest: further trees keyed like ``tree`` (their leaves are passed to ``fn`` in order).

    Returns:
        A new tree keyed like ``tree`` (a tensor if ``tree`` is one).

    Example:
        >>> import torch
        >>> tree_map(torch.neg, {"w": torch.ones(2)})["w"]
        tensor([-1., -1.])
    """
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_add(a: TreeOrTensor, b: TreeOrTensor) -> TreeOrTensor:
    """Leaf-wise ``a + b``.

    Args:
        a: a tree (or tensor).
        b: a tree keyed like ``a``, leaves broadcastable to ``a``'s.

    Returns:
        A new tree keyed like ``a``.

    Example:
        >>> import torch
        >>> tree_add({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """
    return tree_map(torch.add, a, b)


def tree_sub(a: TreeOrTensor, b: TreeOrTensor) -> TreeOrTensor:
    """Leaf-wise ``a - b``.

    Args:
        a: a tree (or tensor).
        b: a tree keyed like ``a``, leaves broadcastable to ``a``'s.

    Returns:
        A new tree keyed like ``a``.

    Example:
        >>> import torch
        >>> tree_sub({"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([0., 0.])
    """
    return tree_map(torch.sub, a, b)


def tree_scale(a: TreeOrTensor, s: float | Tensor) -> TreeOrTensor:
    """Leaf-wise ``s * a``; ``s`` may be a 0-dim tensor (no host sync).

    Args:
        a: a tree (or tensor).
        s: a Python number or a 0-dim tensor (cast to each leaf's dtype).

    Returns:
        A new tree keyed like ``a``.

    Example:
        >>> import torch
        >>> tree_scale({"w": torch.ones(2)}, torch.tensor(3.0))["w"]
        tensor([3., 3.])
    """
    if isinstance(s, Tensor):
        return tree_map(lambda x: x * s.to(x.dtype), a)
    return tree_map(lambda x: x * s, a)


def tree_axpy(alpha: float | Tensor, x: TreeOrTensor, y: TreeOrTensor) -> TreeOrTensor:
    """Leaf-wise ``alpha * x + y``; ``alpha`` may be a 0-dim tensor (no host sync).

    Args:
        alpha: a Python number or a 0-dim tensor.
        x: a tree (or tensor).
        y: a tree keyed and shaped like ``x``.

    Returns:
        A new tree keyed like ``x``.

    Example:
        >>> import torch
        >>> tree_axpy(2.0, {"w": torch.ones(2)}, {"w": torch.ones(2)})["w"]
        tensor([3., 3.])
    """
    if isinstance(alpha, Tensor):
        return tree_map(lambda u, v: torch.addcmul(v, alpha.to(u.dtype), u), x, y)
    return tree_map(lambda u, v: torch.add(v, u, alpha=alpha), x, y)


def tree_vdot(a: TreeOrTensor, b: TreeOrTensor) -> Tensor:
    """Inner product :math:`\\sum_k \\langle a_k, b_k \\rangle` as a 0-dim tensor (>= float32).

    Args:
        a: a non-empty tree (or tensor).
        b: a tree keyed and shaped like ``a``.

    Returns:
        A 0-dim tensor in ``a``'s dtype promoted to at least float32.

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
    if isinstance(a, Tensor):
        return _dot(a, b)
    total = None
    for k, v in a.items():
        term = _dot(v, b[k])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("tree_vdot got an empty tree `a`: pass at least one tensor.")
    return total


def _is_dtensor_tree(a: TreeOrTensor) -> bool:
    # FSDP2 block (helper FSDP): a DTensor leaf means the tree is sharded over ranks.
    leaf = a if isinstance(a, Tensor) else next(iter(a.values()), None)
    return leaf is not None and type(leaf).__name__ == "DTensor"


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
        dtype: the target floating dtype, e.g. ``torch.float64``.

    Returns:
        A new tree keyed like ``a``.

    Example:
        >>> import torch
        >>> t = tree_cast({"w": torch.ones(1), "n": torch.ones(1, dtype=torch.long)}, torch.float64)
        >>> t["w"].dtype, t["n"].dtype
        (torch.float64, torch.int64)
    """
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
        ``(flat, unravel)``: a 1-D tensor of length :math:`\\sum_k` ``a[k].numel()`` and a function
        mapping such a vector back to a tree shaped like ``a``.

    Example:
        >>> import torch
        >>> flat, unravel = tree_ravel({"a": torch.ones(2), "b": torch.zeros(1, 2)})
        >>> flat
        tensor([1., 1., 0., 0.])
        >>> unravel(flat)["b"].shape
        torch.Size([1, 2])
    """
    if isinstance(a, Tensor):
        shape = a.shape
        return a.reshape(-1), lambda v: v.reshape(shape)
    keys = list(a.keys())
    shapes = [a[k].shape for k in keys]
    sizes = [a[k].numel() for k in keys]
    flat = torch.cat([a[k].reshape(-1) for k in keys]) if keys else torch.zeros(0)

    def unravel(v: Tensor) -> dict[str, Tensor]:
        parts = torch.split(v, sizes)
        return {k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}

    return flat, unravel


def tree_check_like(name: str, tree: object, reference: TreeOrTensor, ref_name: str) -> None:
    """Raise a clear error unless ``tree`` has the keys and shapes of ``reference``.

    Args:
        name: how ``tree`` is called in the error message (e.g. ``"x0"``).
        tree: the tree to check.
        reference: the tree (or tensor) ``tree`` must match.
        ref_name: how ``reference`` is called in the error message.

    Raises:
        TypeError: ``tree`` is not a dict of tensors (or not a tensor, for a tensor ``reference``).
        ValueError: keys or shapes differ; the message lists the missing/unexpected keys or shapes.

    Example:
        >>> import torch
        >>> tree_check_like("x0", {"w": torch.zeros(3)}, {"w": torch.zeros(2)}, "b")
        Traceback (most recent call last):
        ...
        ValueError: `x0['w']` has shape (3,) but `b['w']` has shape (2,); they must match.
    """
    if isinstance(reference, Tensor):
        if not isinstance(tree, Tensor):
            raise TypeError(f"`{name}` must be a Tensor like `{ref_name}`, got {type(tree).__name__}.")
        if tree.shape != reference.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(tree.shape)} but `{ref_name}` has shape "
                f"{tuple(reference.shape)}; they must match."
            )
        return
    if not isinstance(tree, Mapping):
        raise TypeError(f"`{name}` must be a dict of tensors keyed like `{ref_name}`, got {type(tree).__name__}.")
    if set(tree.keys()) != set(reference.keys()):
        missing = sorted(set(reference) - set(tree))
        extra = sorted(set(tree) - set(reference))
        raise ValueError(f"`{name}` must have the same keys as `{ref_name}`: missing {missing}, unexpected {extra}.")
    for k, ref in reference.items():
        v = tree[k]
        if not isinstance(v, Tensor):
            raise TypeError(f"`{name}[{k!r}]` must be a Tensor, got {type(v).__name__}.")
        if v.shape != ref.shape:
            raise ValueError(
                f"`{name}[{k!r}]` has shape {tuple(v.shape)} but `{ref_name}[{k!r}]` has shape "
                f"{tuple(ref.shape)}; they must match."
            )
