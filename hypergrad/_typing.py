"""Type aliases shared by the whole package (one place, as in torchopt's ``typing``)."""

from __future__ import annotations

from typing import Callable, Mapping, Union

from torch import Tensor

#: A parameter tree: a flat mapping from names to tensors (what ``nn.Module.named_parameters`` gives).
TensorTree = Mapping[str, Tensor]
#: A tree or a single tensor; the tree utilities and solvers accept either.
TreeOrTensor = Union[TensorTree, Tensor]
#: A linear map on trees, ``v -> A v``.
MatVec = Callable[[TreeOrTensor], TreeOrTensor]
#: ``loss(params, hparams) -> scalar tensor``.
BilevelLoss = Callable[[TensorTree, TensorTree], Tensor]
#: ``phi(params, hparams) -> params``: one step of a fixed-point map.
FixedPointMap = Callable[[TensorTree, TensorTree], TensorTree]

__all__ = ["TensorTree", "TreeOrTensor", "MatVec", "BilevelLoss", "FixedPointMap"]
