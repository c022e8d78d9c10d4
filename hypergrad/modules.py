r"""Turning ``nn.Module`` s into functions of parameter trees, with an explicit buffer policy.

Inside ``torch.func`` transforms (the HVPs of every solver) a module must not mutate a tensor
created outside the transform, yet BatchNorm in training mode updates its running statistics in
place. hypergrad therefore never runs a module's own buffers through a transform. Buffers are
passed functionally, and :func:`stateless` offers two policies for normalisation layers that
track running statistics (BatchNorm, SyncBatchNorm, InstanceNorm with ``track_running_stats``):

* ``buffers="batch_stats"`` (default): the layer normalises with the current batch's statistics,
  exactly as in a training-mode forward pass, and its running statistics are neither read nor
  written. This is what the inner loss *is* during training, so Hessians and hypergradients are
  those of the training objective. Running statistics keep being updated only by the ordinary
  (non-transformed) training steps that the user runs. (SyncBatchNorm increments its
  ``num_batches_tracked`` in training mode and refuses ``None`` there: it gets a scratch zero
  tensor per call instead, never its own buffer. Its cross-rank synchronisation, which runs with
  two or more ranks, has no double backward in PyTorch, so second order through SyncBatchNorm is
  possible on one rank only; use plain BatchNorm in the bilevel stage.)
* ``buffers="running_stats"``: the layer normalises with its stored running statistics (as in
  ``eval()``), which are not updated. Use it when the objective is defined in eval mode. To do so,
  the normalisation layers' ``.training`` flag is set to ``False`` for the duration of each call
  and restored afterwards (also when the call raises); nothing else of the module is touched. Do
  not run the same module concurrently from another thread during such a call.

Other buffers are passed as they are, read-only.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._checks import check_choice
from ._typing import TensorTree

__all__ = ["BufferPolicy", "stateless", "module_params", "tracks_running_stats"]

BufferPolicy = Literal["batch_stats", "running_stats"]
BUFFER_POLICIES: tuple[str, ...] = ("batch_stats", "running_stats")
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def tracks_running_stats(module: nn.Module) -> bool:
    """True for a normalisation layer that keeps running statistics (BatchNorm and friends).

    Args:
        module: any module (only its own attributes are inspected, not its children).

    Returns:
        ``True`` when ``module.track_running_stats`` is set and ``running_mean`` exists.

    Example:
        >>> import torch
        >>> tracks_running_stats(torch.nn.BatchNorm1d(3)), tracks_running_stats(torch.nn.LayerNorm(3))
        (True, False)
    """
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


def module_params(module: nn.Module, *, trainable_only: bool = True) -> dict[str, Tensor]:
    """``dict(module.named_parameters())`` detached, optionally only those with ``requires_grad``.

    Args:
        module: the network.
        trainable_only: skip parameters with ``requires_grad=False`` (frozen layers).

    Returns:
        ``{name: tensor}``, detached views sharing memory with the parameters, ready to pass to
        the function :func:`stateless` returns.

    Example:
        >>> import torch
        >>> sorted(module_params(torch.nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"`module` must be an nn.Module, got {type(module).__name__}; module_params reads "
            "module.named_parameters() (a dict of tensors is already a parameter tree)."
        )
    return {k: v.detach() for k, v in module.named_parameters() if v.requires_grad or not trainable_only}


def stateless(module: nn.Module, *, buffers: BufferPolicy = "batch_stats") -> Callable[..., Any]:
    r"""A pure function ``f(params, *args, **kwargs)`` that runs ``module`` with ``params``.

    ``params`` may hold any subset of the module's parameters (the rest are taken from the
    module, detached); a key that names no parameter or buffer of the module (a misspelling) is a
    ``ValueError``, never silently ignored. Buffers follow the policy in this module's docstring.
    The module's parameters and buffers are never written (buffers are passed as copies, so a
    forward that updates one in place, e.g. spectral norm's power iteration, updates the copy), so
    ``f`` is safe under ``torch.func.grad``, ``jvp``, ``vjp`` and ``vmap``; with ``buffers="running_stats"`` the
    normalisation layers' ``.training`` flag is switched off during the call and restored after.

    Args:
        module: the network.
        buffers: ``"batch_stats"`` or ``"running_stats"``.

    Returns:
        ``f(params, *args, **kwargs)``: the module's output with ``params`` (a dict keyed by
        parameter names) in place of the module's own parameters.

    Raises:
        ValueError: (when ``f`` is called) a key of ``params`` is not a parameter or buffer name.
        TypeError: ``params`` is not a dict of tensors.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> f = stateless(net)
        >>> y = f(module_params(net), torch.randn(8, 3))
        >>> net[1].num_batches_tracked.item()  # running statistics untouched
        0
    """
    check_choice("buffers", buffers, BUFFER_POLICIES)
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be an nn.Module, got {type(module).__name__}.")
    norm_prefixes = [name for name, m in module.named_modules() if tracks_running_stats(m)]
    # SyncBatchNorm refuses num_batches_tracked=None in training mode (it increments it): a scratch counter
    scratch = {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, m in module.named_modules()
        if isinstance(m, nn.SyncBatchNorm) and tracks_running_stats(m)
    }

    def is_running(name: str) -> bool:
        prefix, _, leaf = name.rpartition(".")
        return leaf in _RUNNING and prefix in norm_prefixes

    known: set[str] = set()
    own_tensors: dict[str, Tensor] = {}

    def check_keys(params: Any) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(f"`params` must be a dict {{name: tensor}}, got {type(params).__name__}.")
        if not known or not known.issuperset(params):
            known.clear()
            known.update(n for n, _ in module.named_parameters(remove_duplicate=False))
            known.update(n for n, _ in module.named_buffers(remove_duplicate=False))
            own_tensors.clear()
            own_tensors.update(module.named_parameters(remove_duplicate=False))
            own_tensors.update(module.named_buffers(remove_duplicate=False))
        unknown = [k for k in params if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} -> did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise ValueError(
                f"`params` has key(s) {unknown[:5]} that name no parameter or buffer of the "
                f"{type(module).__name__}; they would be ignored and the module's own tensors used instead. "
                f"{hint + ' ' if hint else ''}Use the names of module.named_parameters()."
            )
        for k, t in params.items():
            own = own_tensors.get(k)
            if isinstance(t, Tensor) and own is not None and t.shape != own.shape:
                own_tensors.update(module.named_parameters(remove_duplicate=False))  # the module may have changed
                own_tensors.update(module.named_buffers(remove_duplicate=False))
                own = own_tensors[k]
                if t.shape == own.shape:
                    continue
                raise ValueError(
                    f"`params[{k!r}]` has shape {tuple(t.shape)} but the {type(module).__name__}'s {k!r} has shape "
                    f"{tuple(own.shape)}; pass a tensor shaped like module.get_parameter({k!r})."
                )

    def call(params: TensorTree, *args: Any, **kwargs: Any) -> Any:
        check_keys(params)
        state: dict[str, Any] = {}
        for name, b in module.named_buffers():
            if buffers == "batch_stats" and is_running(name):
                state[name] = torch.zeros_like(b) if name in scratch else None
            else:  # a copy: a forward that writes a buffer in place (spectral norm, a counter) writes the copy
                state[name] = b.detach().clone()
        state.update(params)
        if buffers == "running_stats" and norm_prefixes:
            return _eval_norm_layers(module, norm_prefixes, state, args, kwargs)
        return functional_call(module, state, args, kwargs, strict=False)

    return call


def _eval_norm_layers(module: nn.Module, prefixes: list[str], state: dict, args: tuple, kwargs: dict) -> Any:
    layers = [module.get_submodule(p) if p else module for p in prefixes]
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.training = False
        return functional_call(module, state, args, kwargs, strict=False)
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode
