"""One supervised epoch loop, shared by the head warm-up of the BiSSL stage and fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["supervised_epoch"]


def supervised_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    *,
    scheduler: Any = None,
    after_backward: Callable[[], None] | None = None,
) -> tuple[float, bool]:
    """Train ``model`` for one pass over ``loader`` with cross-entropy; stop at a non-finite loss.

    The caller chooses the mode (``model.train()`` / frozen parts) and which parameters the
    optimiser updates; this loop only runs forward, backward, ``after_backward`` (e.g. averaging
    gradients over ranks), the optimiser step and, per step, ``scheduler.step()``.

    Args:
        model: maps images to logits.
        loader: ``(images, labels)`` batches.
        optimizer: updates the trained parameters.
        device: where batches are moved.
        scheduler: stepped after every optimiser step (``None``: no schedule).
        after_backward: called between ``backward`` and ``optimizer.step``.

    Returns:
        ``(last loss, finite)``; ``finite`` is ``False`` when a loss was NaN/inf (the loop stops there).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> batches = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
        >>> loss, ok = supervised_epoch(net, batches, opt, "cpu")
        >>> ok and loss > 0
        True
    """
    loss_fn = nn.CrossEntropyLoss()
    last = float("nan")
    for x, y in loader:
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        last = float(loss.detach())
        if last != last or last in (float("inf"), float("-inf")):
            return last, False
    return last, True
