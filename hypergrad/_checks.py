"""Input validation shared by the public functions. Every error names the argument and the fix."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .solvers import AbstractLinearSolver


def check_tree(name: str, tree: Any, *, finite: bool = True) -> dict[str, Tensor]:
    """A non-empty dict of floating-point tensors on one device; returns a detached copy."""
    if isinstance(tree, Tensor):
        raise TypeError(
            f"`{name}` must be a dict of tensors, got a single Tensor; wrap it: {{'{name}': tensor}}."
        )
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
        devices.add(v.device)
        out[k] = v.detach()
    if len(devices) > 1:
        raise ValueError(f"`{name}` mixes devices {sorted(map(str, devices))}; move all tensors to one device.")
    if finite:
        bad = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"`{name}` has non-finite values (NaN or Inf) in {bad}; the hypergradient would be meaningless.")
    return out


def check_same_device(a: Mapping[str, Tensor], a_name: str, b: Mapping[str, Tensor], b_name: str) -> None:
    da, db = next(iter(a.values())).device, next(iter(b.values())).device
    if da != db:
        raise ValueError(f"`{a_name}` is on {da} but `{b_name}` is on {db}; move both to one device.")


def check_callable(name: str, fn: Any, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable {signature}, got {type(fn).__name__}.")


def check_solver(solver: Any) -> AbstractLinearSolver:
    if isinstance(solver, AbstractLinearSolver):
        return solver
    if isinstance(solver, type) and issubclass(solver, AbstractLinearSolver):
        raise TypeError(
            f"`solver` must be a solver instance, got the class {solver.__name__}; "
            f"call it: solver={solver.__name__}()."
        )
    hint = ""
    if isinstance(solver, str):
        hint = f" Pass an object, e.g. solver=hypergrad.CG(max_steps=10), not the string {solver!r}."
    raise TypeError(f"`solver` must be a hypergrad.solvers solver, got {type(solver).__name__}.{hint}")


def check_scalar_loss(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must return a scalar Tensor, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"`{name}` must return a scalar, got a tensor of shape {tuple(value.shape)}; "
            "reduce it with .mean() or .sum()."
        )
    if not value.is_floating_point():
        raise TypeError(f"`{name}` returned dtype {value.dtype}; a loss must be floating point.")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` returned {value.item()} at the given point; check the inputs and the loss.")
    return value.reshape(())


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    return float(value)


def loss_grads(
    name: str,
    loss: Callable[[dict, dict], Tensor],
    params: dict[str, Tensor],
    hparams: dict[str, Tensor],
) -> tuple[dict[str, Tensor | None], dict[str, Tensor | None]]:
    """Gradients of ``loss(params, hparams)`` w.r.t. both trees; ``None`` where it does not depend."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    with torch.enable_grad():
        value = check_scalar_loss(name, loss(p, h))
        if not value.requires_grad:
            raise ValueError(
                f"`{name}` depends on neither `params` nor `hparams` (its output has no gradient). "
                "Compute it from the tensors passed in, not from copies or .detach()ed values."
            )
        grads = torch.autograd.grad(value, [*p.values(), *h.values()], allow_unused=True)
    gp = {k: (g.detach() if g is not None else None) for k, g in zip(p, grads[: len(p)])}
    gh = {k: (g.detach() if g is not None else None) for k, g in zip(h, grads[len(p):])}
    return gp, gh


def fill_zeros(grads: dict[str, Tensor | None], like: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (g if g is not None else torch.zeros_like(like[k])) for k, g in grads.items()}
