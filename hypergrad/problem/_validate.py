"""Checks of what the user hands a :class:`~hypergrad.BilevelProblem` at each call.

Batches are opaque to the problem (the losses unpack them), so the checks are the ones that are
always wrong: a string or a single tensor where a list of batches belongs, tensors on the meta
device (no data), a 1-sample batch through a training-mode BatchNorm, a loss that is not a scalar.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

from torch import Tensor, nn

_MAX_DEPTH = 4  # how deep a batch's containers are searched for meta tensors


def check_inner_batches(inner_batches: Any) -> Iterator[Any]:
    """The inner batches of :meth:`BilevelProblem.step`, each checked as it is drawn (iterators stay lazy)."""
    if isinstance(inner_batches, (str, bytes)):
        raise TypeError(
            f"`inner_batches` must be a list or iterator of batches, got the string {inner_batches[:20]!r}; "
            "a string would be iterated character by character. Pass [batch] for a single batch."
        )
    if isinstance(inner_batches, (Tensor, tuple, Mapping)) or not isinstance(inner_batches, Iterable):
        raise TypeError(
            f"`inner_batches` must be a list or iterator of batches, got {type(inner_batches).__name__}; "
            "for a single batch pass [batch]."
        )
    return _checked(inner_batches)


def _checked(batches: Iterable[Any]) -> Iterator[Any]:
    for i, batch in enumerate(batches):
        check_batch(f"inner_batches[{i}]", batch)
        yield batch


def check_trainable(level: str, params: Mapping[str, Tensor]) -> None:
    """The level's trained parameters still require grad (``Level`` checks it at construction only)."""
    frozen = [k for k, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"`{level}` parameters {frozen[:5]} were frozen (requires_grad=False) after the BilevelProblem was built, "
            "but its optimizer still holds them, so they would be stepped anyway (or their gradient would fail). "
            "Unfreeze them, or build the Level and the BilevelProblem again without them."
        )


def check_batch(name: str, batch: Any) -> None:
    """Refuse batches holding meta tensors (they have no data; every loss value would be invalid)."""
    meta = _find_meta(batch, name, 0)
    if meta is not None:
        raise ValueError(
            f"`{meta}` is a tensor on the meta device (shape only, no data); hypergrad needs real values. "
            "Create the batch on 'cpu' or 'cuda' (e.g. tensor.to_empty(device='cpu') and fill it)."
        )


def _find_meta(obj: Any, path: str, depth: int) -> str | None:
    if isinstance(obj, Tensor):
        return path if obj.is_meta else None
    if depth >= _MAX_DEPTH or isinstance(obj, (str, bytes)):
        return None
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _find_meta(v, f"{path}[{k!r}]", depth + 1)
        if found is not None:
            return found
    return None


def check_modules(modules: Mapping[str, nn.Module]) -> None:
    """Refuse modules whose parameters or buffers live on the meta device."""
    for which, module in modules.items():
        meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(
                f"`{which}` has tensors on the meta device (no data): {meta[:5]}; materialise the module first, "
                "e.g. module.to_empty(device='cpu') and re-initialise it, or load_state_dict(..., assign=True)."
            )


def check_loss(name: str, value: Any) -> Tensor:
    """The loss as a 0-dim tensor; a clear error for anything else."""
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
        got = (
            f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise TypeError(f"`{name}` must return a floating-point scalar tensor, got {got}; reduce it with .mean().")
    if value.is_meta:
        raise ValueError(
            f"`{name}` returned a tensor on the meta device (no data): a module or batch it used holds meta "
            "tensors; materialise them on 'cpu' or 'cuda'."
        )
    return value.reshape(())


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


@contextlib.contextmanager
def clear_batchnorm_errors(name: str) -> Iterator[None]:
    """Translate torch's 1-sample BatchNorm error into one naming the batch and the fixes."""
    try:
        yield
    except ValueError as err:
        if "Expected more than 1 value per channel when training" not in str(err):
            raise
        raise ValueError(
            f"`{name}`: a BatchNorm layer in training mode got a batch with 1 sample per channel ({err}); "
            "batch statistics need at least 2 samples. Use batches of 2 or more samples, drop the last "
            "incomplete batch (DataLoader(drop_last=True)), or put the BatchNorm layers in eval mode."
        ) from err
