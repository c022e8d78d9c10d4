"""One level of a bilevel problem: modules, the optimiser that trains them, an optional scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_positive

__all__ = ["Level"]


class _Bundle(nn.Module):
    """Several modules and parameters under one module; ``bundle["name"]`` or ``bundle.name``."""

    def __init__(self, items: Mapping[str, Any]):
        super().__init__()
        for name, value in items.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"Level: `module` keys must be Python identifiers, got {name!r}.")
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                hint = " Wrap tensors in torch.nn.Parameter." if isinstance(value, Tensor) else ""
                raise TypeError(
                    f"Level: `module[{name!r}]` must be an nn.Module or nn.Parameter, got {type(value).__name__}.{hint}"
                )

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a Level built from a dict is not callable; call its entries, e.g. outer['head'](x).")


@dataclass
class Level:
    """The modules of one level, with their ``torch.optim`` optimiser (and optional scheduler).

    The parameters a level trains are exactly those its optimiser holds; other parameters of the
    module are constants for the hypergradient. The losses receive :attr:`module` (a dict becomes
    a module whose entries are reachable as ``level["name"]`` or ``level.name``).

    Args:
        module: an ``nn.Module``, or a dict of ``nn.Module`` / ``nn.Parameter`` (e.g. per-example
            weights as ``{"w": nn.Parameter(torch.zeros(n))}``).
        optimizer: a ``torch.optim.Optimizer`` over (some of) the module's parameters.
        scheduler: optional learning-rate scheduler; stepped after each applied optimiser step.
        max_grad_norm: clip the level's gradient to this total norm before each step (``None``:
            no clipping).

    Example:
        >>> import torch, hypergrad
        >>> net = torch.nn.Linear(3, 1)
        >>> level = hypergrad.Level(net, torch.optim.SGD(net.parameters(), lr=0.1), max_grad_norm=10.0)
        >>> sorted(level.trained_parameters())
        ['bias', 'weight']
    """

    module: Union[nn.Module, Mapping[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any] = None
    max_grad_norm: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.module, Mapping):
            self.module = _Bundle(self.module)
        if not isinstance(self.module, nn.Module):
            raise TypeError(
                f"Level: `module` must be an nn.Module or a dict of modules/parameters, got {type(self.module).__name__}."
            )
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            hint = (
                " Construct it: torch.optim.SGD(module.parameters(), lr=...)."
                if isinstance(self.optimizer, type)
                else ""
            )
            raise TypeError(
                f"Level: `optimizer` must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}.{hint}"
            )
        if self.scheduler is not None and not (
            callable(getattr(self.scheduler, "step", None)) and callable(getattr(self.scheduler, "state_dict", None))
        ):
            raise TypeError(
                f"Level: `scheduler` must have step() and state_dict() (a torch.optim.lr_scheduler), got {type(self.scheduler).__name__}."
            )
        if self.scheduler is not None and getattr(self.scheduler, "optimizer", self.optimizer) is not self.optimizer:
            raise ValueError(
                "Level: `scheduler` was built for a different optimizer than `optimizer`; build it on this level's optimizer."
            )
        check_positive("max_grad_norm", self.max_grad_norm, allow_none=True, owner="Level")
        names = {id(p): n for n, p in self.module.named_parameters()}
        held = [p for g in self.optimizer.param_groups for p in g["params"]]
        foreign = [tuple(p.shape) for p in held if id(p) not in names]
        if foreign:
            raise ValueError(
                f"Level: `optimizer` holds {len(foreign)} tensor(s) (shapes {foreign[:3]}) that are not parameters of "
                "`module`; build the optimizer from this level's module.parameters()."
            )
        if not held:
            raise ValueError("Level: `optimizer` holds no parameters.")
        held_ids = {id(p) for p in held}
        self._trained = {n: p for n, p in self.module.named_parameters() if id(p) in held_ids}
        frozen = [n for n, p in self._trained.items() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"Level: `optimizer` holds parameters with requires_grad=False: {frozen[:5]}; remove them or unfreeze them."
            )

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the parameters the optimiser trains (names as in ``named_parameters``).

        Returns:
            A new dict of the live ``nn.Parameter`` objects (not copies), in module order.

        Example:
            >>> import torch, hypergrad
            >>> net = torch.nn.Linear(2, 1)
            >>> level = hypergrad.Level(net, torch.optim.SGD([net.weight], lr=0.1))  # bias frozen
            >>> list(level.trained_parameters())
            ['weight']
        """
        return dict(self._trained)
