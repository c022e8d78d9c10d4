"""Input validation shared by the public functions and classes. Every error names the argument,
shows the value and says how to fix it.

``owner`` (e.g. ``"CG"``) prefixes a message with the class being constructed. Nothing here imports
other hypergrad modules, so every layer (solvers included) can use it; the solver check lives next
to the class it checks, :func:`hypergrad.solvers._base.check_solver`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Literal, Mapping, Optional, overload

import torch
from torch import Tensor


def _prefix(owner: Optional[str]) -> str:
    return f"{owner}: " if owner else ""


def check_tree(name: str, tree: Any, *, finite: bool = True) -> dict[str, Tensor]:
    """A non-empty dict of floating-point tensors on one device; returns a detached copy."""
    if isinstance(tree, Tensor):
        raise TypeError(f"`{name}` must be a dict of tensors, got a single Tensor; wrap it: {{'{name}': tensor}}.")
    if not isinstance(tree, Mapping):
        hint = " Use dict(module.named_parameters())." if isinstance(tree, torch.nn.Module) else ""
        raise TypeError(f"`{name}` must be a dict of tensors, got {type(tree).__name__}.{hint}")
    if len(tree) == 0:
        raise ValueError(f"`{name}` is empty: pass at least one tensor to differentiate.")
    devices = set()
    out = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise TypeError(f"`{name}` keys must be strings, got {k!r} ({type(k).__name__}).")
        if not isinstance(v, Tensor):
            raise TypeError(f"`{name}[{k!r}]` must be a Tensor, got {type(v).__name__}.")
        if not v.is_floating_point():
            raise TypeError(
                f"`{name}[{k!r}]` has dtype {v.dtype}; only floating-point tensors can be "
                "differentiated. Cast it with .float() or move it out of the tree."
            )
        if v.device.type == "meta":
            raise ValueError(
                f"`{name}[{k!r}]` is on the meta device, which holds no data; materialise it first "
                "(e.g. module.to_empty(device=...) and load the weights)."
            )
        devices.add(v.device)
        out[k] = v.detach()
    if len(devices) > 1:
        raise ValueError(f"`{name}` mixes devices {sorted(map(str, devices))}; move all tensors to one device.")
    if finite:
        bad = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(
                f"`{name}` has non-finite values (NaN or Inf) in {bad}; the hypergradient would be meaningless."
            )
    return out


def check_same_device(a: Mapping[str, Tensor], a_name: str, b: Mapping[str, Tensor], b_name: str) -> None:
    da, db = next(iter(a.values())).device, next(iter(b.values())).device
    if da != db:
        raise ValueError(f"`{a_name}` is on {da} but `{b_name}` is on {db}; move both to one device.")


def check_callable(name: str, fn: Any, signature: str, *, owner: Optional[str] = None) -> None:
    """``fn`` is callable; ``signature`` (e.g. ``"(params, hparams) -> scalar"``) is shown on error."""
    if not callable(fn):
        raise TypeError(f"{_prefix(owner)}`{name}` must be a callable {signature}, got {type(fn).__name__}.")


def check_scalar_loss(name: str, value: Any, *, finite: bool = True) -> Tensor:
    """A floating-point tensor with one element (finite unless ``finite=False``), reshaped to 0-dim."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must return a scalar Tensor, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must return a scalar, got a tensor of shape {tuple(value.shape)}; "
            "reduce it with .mean() or .sum()."
        )
    if not value.is_floating_point():
        raise TypeError(f"`{name}` returned dtype {value.dtype}; a loss must be floating point.")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` returned {value.item()} at the given point; check the inputs and the loss.")
    return value.reshape(())


@overload
def check_positive(
    name: str, value: Any, *, allow_zero: bool = ..., allow_none: Literal[False] = ..., owner: Optional[str] = ...
) -> float: ...


@overload
def check_positive(
    name: str, value: Any, *, allow_zero: bool = ..., allow_none: bool = ..., owner: Optional[str] = ...
) -> Optional[float]: ...


def check_positive(
    name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False, owner: Optional[str] = None
) -> Optional[float]:
    """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``; ``None`` passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        optional = "None or " if allow_none else ""
        raise ValueError(f"{_prefix(owner)}`{name}` must be {optional}a finite number {bound}, got {value!r}.")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int = 1, owner: Optional[str] = None) -> int:
    """An ``int`` (not a ``bool``) ``>= minimum``; a float gets a hint to pass an int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (a float? pass an int)." if isinstance(value, float) else "."
        raise ValueError(f"{_prefix(owner)}`{name}` must be an integer >= {minimum}, got {value!r}{hint}")
    return value


def check_truncate(value: Any, steps_name: str, steps: int, *, owner: Optional[str] = None) -> Optional[int]:
    """``None`` or an ``int`` in ``[1, steps]``: how many of ``steps`` unrolled steps to differentiate."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= steps):
        raise ValueError(
            f"{_prefix(owner)}`truncate` must be None or an integer in [1, {steps_name}={steps}], got {value!r}."
        )
    return value


def check_choice(name: str, value: Any, allowed: Collection[Any], *, owner: Optional[str] = None) -> None:
    """``value`` is one of ``allowed`` (two options read "'a' or 'b'", more "one of [...]")."""
    if value not in allowed:
        options = " or ".join(map(repr, allowed)) if len(allowed) == 2 else f"one of {list(allowed)}"
        raise ValueError(f"{_prefix(owner)}`{name}` must be {options}, got {value!r}.")


def loss_grads(
    name: str,
    loss: Callable[[dict, dict], Tensor],
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    finite: bool = True,
    require_path: bool = True,
) -> tuple[Tensor, dict[str, Tensor | None], dict[str, Tensor | None]]:
    """``(value, grad_params, grad_hparams)`` of ``loss(params, hparams)``; ``None`` where it does not depend.

    The one loss-gradient helper of the package (functional API and methods). ``value`` is the
    detached 0-dim loss; with ``finite=False`` a non-finite value is returned instead of refused
    (the methods report it as :class:`~hypergrad.NonFiniteError`). A loss that depends on neither
    tree is refused, or, with ``require_path=False``, returned with every gradient ``None``.
    """
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad():
        value = check_scalar_loss(name, loss(p, h), finite=finite)
        if not value.requires_grad and not require_path:
            return value.detach(), dict.fromkeys(p), dict.fromkeys(h)
        if not value.requires_grad:
            raise ValueError(
                f"`{name}` depends on neither `params` nor `hparams` (its output has no gradient). "
                "Compute it from the tensors passed in, not from copies or .detach()ed values."
            )
        grads = torch.autograd.grad(value, [*p.values(), *h.values()], allow_unused=True)
    gp: dict[str, Tensor | None] = {k: (g.detach() if g is not None else None) for k, g in zip(p, grads[: len(p)])}
    gh: dict[str, Tensor | None] = {k: (g.detach() if g is not None else None) for k, g in zip(h, grads[len(p) :])}
    return value.detach(), gp, gh


def fill_zeros(grads: dict[str, Tensor | None], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace ``None`` gradients (a tree the loss does not depend on) by zeros shaped like ``like``."""
    return {k: (g if g is not None else torch.zeros_like(like[k])) for k, g in grads.items()}


def check_rtol(name: str, value: Any, *, owner: Optional[str] = None) -> float:
    """A relative tolerance: a finite number in ``[0, 1)`` (0 disables it).

    A relative tolerance of 1 or more is met by ``x = 0`` before any product
    (:math:`\\|b - A\\,0\\| = \\|b\\|`), so such a solve would report success with a zero solution.
    """
    check_positive(name, value, allow_zero=True, owner=owner)
    if value >= 1:
        raise ValueError(
            f"{_prefix(owner)}`{name}` must be in [0, 1), got {value!r}: a relative tolerance of 1 or more is met "
            f"by x = 0 without a single product (||b - A 0|| = ||b||), so every solve would 'succeed' with a zero "
            f"solution. Use e.g. {name}=1e-4 (or 0 to disable it)."
        )
    return float(value)


def check_invertible(name: str, value: Any, *, owner: Optional[str] = None) -> float:
    """A finite number ``> 0`` whose reciprocal is finite too (``1/value`` does not overflow)."""
    value = check_positive(name, value, owner=owner)
    if not math.isfinite(1.0 / value):
        raise ValueError(
            f"{_prefix(owner)}`{name}` must be a finite number > 0 and not so small that 1/{name} overflows "
            f"(at least {1.0 / 1.7976931348623157e308:.3g}), got {value!r}; e.g. {name}=1e-3."
        )
    return value
