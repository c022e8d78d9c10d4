r"""Coding rate and coding-rate reduction (MCR^2) of L2-normalised features.

For features :math:`Z \in \mathbb{R}^{n \times d}` whose rows are unit vectors and a distortion
:math:`\epsilon^2` (``eps2``: eps *squared*, as in the MCR^2 convention of Yu et al. 2020),

.. math::

    R(Z, \epsilon^2) = \tfrac12 \log\det\Big(I_d + \frac{d}{n\,\epsilon^2} Z^\top Z\Big)
                     = \tfrac12 \log\det\Big(I_n + \frac{d}{n\,\epsilon^2} Z Z^\top\Big),

(the second form, Sylvester's determinant identity, is used when :math:`n < d`), and for a
partition of the rows into groups :math:`j` with :math:`n_j` rows :math:`Z_j`,

.. math::

    \Delta R(Z, \Pi, \epsilon^2) = R(Z, \epsilon^2) - \sum_j \frac{n_j}{n} R(Z_j, \epsilon^2)
    \;\ge\; 0 .

:math:`\Delta R \ge 0` because :math:`\log\det(I + cA)` is concave in :math:`A` and increasing
in :math:`c`: :math:`\frac{d}{n\epsilon^2} Z^\top Z = \sum_j \frac{n_j}{n}\,\frac{d}{n_j \epsilon^2}
Z_j^\top Z_j`. Large :math:`\Delta R`: the whole set spans many directions while each group is
compressed. The log-determinants come from a Cholesky factor of a matrix whose eigenvalues are
all :math:`\ge 1`, which is well conditioned in float32; groups are padded to one size and
factorised in one batched call (padded rows are zero, so they add an identity block and leave the
determinant unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["coding_rate", "coding_rate_reduction", "two_view_labels"]


def _check_eps2(eps2: float) -> float:
    if isinstance(eps2, bool) or not isinstance(eps2, (int, float)) or not eps2 > 0 or eps2 != eps2:
        raise ValueError(
            f"`eps2` (the squared distortion eps^2) must be a number > 0, got {eps2!r}; MCR^2 uses 0.01-0.5."
        )
    return float(eps2)


def _check_features(Z: Tensor, normalize: bool) -> Tensor:
    if not isinstance(Z, Tensor):
        raise TypeError(f"`Z` must be a torch.Tensor of shape (..., n, d), got {type(Z).__name__}.")
    if Z.ndim < 2:
        raise ValueError(f"`Z` must have shape (..., n, d) with n samples of dimension d, got shape {tuple(Z.shape)}.")
    if not Z.is_floating_point():
        raise TypeError(f"`Z` must be a floating-point tensor, got dtype {Z.dtype}; cast it with Z.float().")
    if Z.shape[-2] < 1 or Z.shape[-1] < 1:
        raise ValueError(f"`Z` must hold at least one sample of dimension >= 1, got shape {tuple(Z.shape)}.")
    if not bool(torch.isfinite(Z).all()):
        bad = int((~torch.isfinite(Z)).any(dim=-1).sum())
        raise ValueError(f"`Z` has {bad} row(s) with NaN or inf features; the coding rate is undefined for them.")
    if not normalize:
        return Z
    norms = Z.detach().norm(dim=-1)
    if bool((norms == 0).any()):
        raise ValueError(
            f"`Z` has {int((norms == 0).sum())} all-zero row(s), which cannot be L2-normalised; drop them first."
        )
    return F.normalize(Z, dim=-1)


def _logdet_spd(M: Tensor) -> Tensor:
    """log det of a batch of symmetric positive-definite matrices via Cholesky."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):  # cannot happen for I + PSD in exact arithmetic; stay safe
        return torch.linalg.slogdet(M)[1]
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def _rate(Z: Tensor, scale: Tensor | float) -> Tensor:
    r""":math:`\tfrac12\log\det(I + s Z^\top Z)` for ``Z (..., n, d)`` and ``scale`` broadcast to ``(...)``."""
    n, d = Z.shape[-2], Z.shape[-1]
    s = torch.as_tensor(scale, dtype=Z.dtype, device=Z.device)[..., None, None]
    if n < d:
        M = Z @ Z.transpose(-1, -2)
        eye = torch.eye(n, dtype=Z.dtype, device=Z.device)
    else:
        M = Z.transpose(-1, -2) @ Z
        eye = torch.eye(d, dtype=Z.dtype, device=Z.device)
    return 0.5 * _logdet_spd(eye + s * M)


def coding_rate(Z: Tensor, eps2: float = 0.5, *, normalize: bool = True) -> Tensor:
    r"""Coding rate :math:`R(Z,\epsilon^2) = \tfrac12\log\det(I_d + \frac{d}{n\epsilon^2}Z^\top Z)`.

    Args:
        Z: features ``(..., n, d)``; leading dimensions are a batch of independent sets.
        eps2: the squared distortion :math:`\epsilon^2 > 0` (``eps2=0.5`` means :math:`\epsilon^2=0.5`).
        normalize: L2-normalise the rows first (the definition assumes unit rows; without it the
            rate is unbounded in the feature scale).

    Returns:
        The rate, shape ``Z.shape[:-2]`` (a scalar for a single set), differentiable in ``Z``.

    Raises:
        TypeError, ValueError: ``Z`` not a float tensor of shape ``(..., n, d)``, non-finite or
        all-zero rows, ``eps2 <= 0``.

    Example:
        >>> Z = torch.eye(4)
        >>> round(float(coding_rate(Z, eps2=1.0)), 4)  # 1/2 logdet(I + I) = 2 log 2
        1.3863
    """
    eps2 = _check_eps2(eps2)
    Z = _check_features(Z, normalize)
    n, d = Z.shape[-2], Z.shape[-1]
    return _rate(Z, d / (n * eps2))


def two_view_labels(batch: int, *, device: torch.device | str | None = None) -> Tensor:
    """Labels of the two-views partition of ``cat([z1, z2])``: image ``i``'s two views form group ``i``.

    Example:
        >>> two_view_labels(3).tolist()
        [0, 1, 2, 0, 1, 2]
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"`batch` must be a positive int, got {batch!r}.")
    return torch.arange(batch, device=device).repeat(2)


def coding_rate_reduction(
    Z: Tensor, labels: Tensor, eps2: float = 0.5, *, normalize: bool = True, min_group_size: int = 2
) -> Tensor:
    r"""Coding-rate reduction :math:`\Delta R = R(Z) - \sum_j \frac{n_j}{n} R(Z_j)` of a partition.

    Args:
        Z: features ``(n, d)``.
        labels: group of every row, an integer tensor ``(n,)`` (any values; e.g. class labels, or
            :func:`two_view_labels` for the SSL partition in which each image's views are a group).
        eps2: the squared distortion :math:`\epsilon^2 > 0`.
        normalize: L2-normalise the rows first.
        min_group_size: refuse groups with fewer rows (a one-row group has a constant rate
            :math:`\frac12\log(1 + d/\epsilon^2)` that carries no information about ``Z``).

    Returns:
        :math:`\Delta R \ge 0`, a scalar differentiable in ``Z``.

    Raises:
        TypeError, ValueError: bad shapes or dtypes, a group smaller than ``min_group_size``,
        non-finite features, ``eps2 <= 0``.

    Example:
        >>> Z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        >>> bool(coding_rate_reduction(Z, torch.tensor([0, 0, 1, 1]), eps2=0.5) > 0)
        True
    """
    eps2 = _check_eps2(eps2)
    Z = _check_features(Z, normalize)
    if Z.ndim != 2:
        raise ValueError(f"`Z` must have shape (n, d) for coding_rate_reduction, got {tuple(Z.shape)}.")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.is_complex():
        raise TypeError(f"`labels` must be an integer tensor of shape (n,), got {labels!r:.80}.")
    if labels.shape != (Z.shape[0],):
        raise ValueError(f"`labels` must have shape ({Z.shape[0]},) to match Z's rows, got {tuple(labels.shape)}.")
    if not isinstance(min_group_size, int) or min_group_size < 1:
        raise ValueError(f"`min_group_size` must be a positive int, got {min_group_size!r}.")
    n, d = Z.shape
    groups, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    small = counts < min_group_size
    if bool(small.any()):
        raise ValueError(
            f"`labels` has {int(small.sum())} group(s) with fewer than min_group_size={min_group_size} rows "
            f"(e.g. label {groups[small][0].item()} with {counts[small][0].item()}); merge or drop them, "
            "or lower min_group_size."
        )
    G, m = groups.numel(), int(counts.max())
    order = torch.argsort(inverse, stable=True)
    sorted_groups = inverse[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=Z.device) - starts[sorted_groups]
    padded = Z.new_zeros(G, m, d).index_put((sorted_groups, slot), Z[order])
    scale = d / (counts.to(Z.dtype) * eps2)
    rates = _rate(padded, scale)  # padded zero rows add an identity block: determinant unchanged
    whole = _rate(Z, d / (n * eps2))
    return whole - (counts.to(Z.dtype) / n * rates).sum()
