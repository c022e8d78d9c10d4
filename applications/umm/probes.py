"""Frozen-feature evaluation: linear probe and k-nearest-neighbour accuracy.

Both take pooled features of a labelled training set and of a test set:

* :func:`linear_probe`: multinomial logistic regression on standardised features (statistics of
  the training set), full-batch L-BFGS with a small L2 penalty, deterministic.
* :func:`knn_accuracy`: cosine similarity, the ``k`` nearest training points vote with weights
  :math:`\\exp(s/0.07)` (the InstDisc/DINO rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_accuracy", "linear_probe"]


def _check(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {tuple(train_x.shape)} and {tuple(test_x.shape)}.")
    if train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError("labels must be (n,) vectors matching the feature rows.")


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, steps: int = 100, wd: float = 1e-4
) -> float:
    """Top-1 test accuracy of a logistic-regression probe trained on ``(train_x, train_y)``.

    Example:
        >>> x = torch.randn(40, 3); y = (x[:, 0] > 0).long()
        >>> linear_probe(x, y, x, y) > 0.9
        True
    """
    _check(train_x, train_y, test_x, test_y)
    train_x, test_x = train_x.double(), test_x.double()
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    classes = int(max(train_y.max(), test_y.max())) + 1
    W = torch.zeros(a.shape[1], classes, dtype=a.dtype, requires_grad=True)
    c = torch.zeros(classes, dtype=a.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, c], lr=1.0, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ W + c, train_y) + wd * (W**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((b @ W + c).argmax(1) == test_y).double().mean())


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, k: int = 20) -> float:
    """Top-1 accuracy of a similarity-weighted cosine kNN classifier.

    Example:
        >>> x = torch.randn(30, 4); y = (x[:, 1] > 0).long()
        >>> knn_accuracy(x, y, x, y, k=1)
        1.0
    """
    _check(train_x, train_y, test_x, test_y)
    k = min(int(k), train_x.shape[0])
    a, b = F.normalize(train_x.double(), dim=1), F.normalize(test_x.double(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for start in range(0, b.shape[0], 1024):
        sims, idx = (b[start : start + 1024] @ a.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], classes, dtype=a.dtype)
        votes.scatter_add_(1, train_y[idx], torch.exp(sims / 0.07))
        correct += int((votes.argmax(1) == test_y[start : start + 1024]).sum())
    return correct / b.shape[0]
