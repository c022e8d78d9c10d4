r"""Hessian-vector products on a ``fully_shard``-ed (FSDP2) module.

PyTorch's FSDP2 all-gathers each block's parameters for its forward pass and reduce-scatters the
gradients in its backward hooks, outside autograd's view, so ``torch.func`` transforms and
``torch.autograd.grad`` with respect to the sharded parameters do not work on the wrapped module
(measured with torch 2.14.1: "One of the differentiated Tensors appears to not have been used in
the graph"). Four routes that do work, each taking and returning trees of ``DTensor`` s sharded
like the parameters (:mod:`hypergrad.fsdp.vectors`):

* ``"finite_diff"`` (approximate): central differences of two ordinary ``backward()`` passes of
  the sharded module, :math:`Hv \approx (\nabla f(\theta+\epsilon u) - \nabla f(\theta-\epsilon u))
  \|v\| / 2\epsilon` with :math:`u = v/\|v\|` and :math:`\epsilon = \epsilon_{mach}^{1/3}(1+\|\theta\|)`;
  relative error about :math:`\epsilon_{mach}^{2/3}`. Memory: FSDP's own, plus one saved copy of
  the local parameter shards.
* ``"finite_diff_cached"`` (approximate): one-sided differences against the gradient at
  :math:`\theta` computed once when the operator is built, one ``backward()`` per product,
  :math:`\epsilon = \epsilon_{mach}^{1/2}(1+\|\theta\|)`, relative error about :math:`\epsilon_{mach}^{1/2}`.
* ``"exact"``: double backward through ``DTensor``: the loss is evaluated on ``dense_module`` (the
  same architecture, unsharded, e.g. on the meta device) through ``torch.func.functional_call``
  with the *sharded* ``DTensor`` parameters and the batch as a ``Shard(0)`` ``DTensor``; DTensor's
  sharding propagation inserts the collectives and autograd differentiates through them twice.
  The first-order graph is built once, at construction; every product is one backward pass
  through it. Exact to rounding; the graph keeps the gathered activations and weights it used.

* ``"exact_gathered"``: ordinary double backward (reverse over reverse) on *gathered* weights: each
  rank evaluates its loss on ``dense_module`` through ``torch.func.functional_call`` with the full
  (all-gathered, plain) parameters and its own local batch, builds the first-order graph once, and
  per product differentiates it against the gathered vector; the per-rank products are averaged
  with one ``all_reduce`` and each rank keeps its shard. Exact to rounding for any loss (no
  ``DTensor`` operation support needed: plain tensors inside, e.g. SimCLR's masks, BatchNorm with
  each rank's statistics); memory and communication of data parallelism during the products (the
  full parameters, vector and graph on every rank).

The losses are means over each rank's equally sized local batch; every route then returns the
Hessian of the mean over the concatenated global batch (FSDP averages gradients over ranks).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.func import functional_call

from .._second_order import second_order
from ..distributed import all_reduce_mean
from ..operators import LinearOperator, _refuse_once_differentiable
from ._module import check_dense_module, compute_dtype, mesh_of, sharded_params
from .vectors import check_sharded_like

__all__ = ["SHARDED_HVP_MODES", "ShardedHVPMode", "ShardedHessianOperator", "sharded_value_and_grad", "ShardedLoss"]

ShardedHVPMode = Literal["finite_diff", "finite_diff_cached", "exact", "exact_gathered"]
SHARDED_HVP_MODES: tuple[str, ...] = ("finite_diff", "finite_diff_cached", "exact", "exact_gathered")
#: ``loss(module, hparams, *batch) -> scalar``: the mean loss of ``module`` on this rank's batch.
ShardedLoss = Callable[..., Tensor]


def _check_loss_value(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{what}` must return a scalar tensor (the mean over the local batch), got {shape}.")
    return value


def _backward_grads(
    module: nn.Module,
    loss: ShardedLoss,
    batch: Sequence[Any],
    hparams: dict[str, Tensor],
    keys: Sequence[str],
    what: str,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """One forward and ``backward()`` of the sharded module: (loss, sharded grads, rank-averaged hparam grads).

    The parameters' existing ``.grad`` are put back afterwards, so a user's accumulation is untouched.
    """
    named = dict(module.named_parameters())
    saved = {k: p.grad for k, p in named.items()}
    for p in named.values():
        p.grad = None
    try:
        h = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
        with torch.enable_grad():
            value = _check_loss_value(loss(module, h, *batch), what)
            value.backward()
        g = {}
        for k in keys:
            gk = named[k].grad
            g[k] = torch.zeros_like(named[k]) if gk is None else gk.detach()
        gh = {k: torch.zeros_like(v) if v.grad is None else v.grad.detach() for k, v in h.items()}
        # FSDP2 averaged the sharded gradients (reduce-scatter); replicated (plain) ones are averaged here,
        # in the same collective as the hyper-parameter gradients and the loss
        plain = {"p." + k: v for k, v in g.items() if not isinstance(v, DTensor)}
        packed = all_reduce_mean(
            {**plain, **{"h." + k: v for k, v in gh.items()}, "loss": value.detach().reshape(1).double()}
        )
        g = {k: packed["p." + k] if "p." + k in packed else v for k, v in g.items()}
    finally:
        for k, p in named.items():
            p.grad = saved[k]
    return packed["loss"].reshape(()), g, {k: packed["h." + k] for k in hparams}


def sharded_value_and_grad(
    module: nn.Module, loss: ShardedLoss, batch: Sequence[Any], hparams: Optional[dict[str, Tensor]] = None
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    r"""Loss and gradients of a ``fully_shard``-ed module by one ordinary ``backward()``.

    .. math:: \Big(\bar f,\ \nabla_\theta \bar f,\ \nabla_\lambda \bar f\Big),\qquad \bar f = \frac{1}{R}\sum_r f(\theta, \lambda; B_r)

    Args:
        module: the ``fully_shard``-ed module :math:`\theta`.
        loss: ``loss(module, hparams, *batch) -> scalar``, the mean over this rank's batch.
        batch: this rank's batch, a tuple passed to ``loss`` after ``hparams``.
        hparams: plain tensors :math:`\lambda`, identical on every rank (``None`` for none).

    Returns:
        ``(value, g_theta, g_lambda)``: the rank-averaged loss (float64, 0-dim), the gradient as
        ``{name: DTensor}`` sharded like the trainable parameters, and the rank-averaged gradient
        with respect to ``hparams`` (plain tensors). The module's ``.grad`` fields are left as they were.

    Example:
        >>> import torch
        >>> from hypergrad.fsdp import sharded_value_and_grad
        >>> sharded_value_and_grad(torch.nn.Linear(2, 1), lambda m, h, x: m(x).mean(), (torch.ones(3, 2),))
        Traceback (most recent call last):
        ...
        TypeError: `module` (Linear) is not wrapped with torch.distributed.fsdp.fully_shard. Wrap it (`fully_shard(layer)` for each block, then `fully_shard(module)`), or use hypergrad.implicit_grad / hypergrad.BilevelProblem for an unsharded model.
    """
    params = sharded_params(module)
    return _backward_grads(module, loss, tuple(batch), dict(hparams or {}), list(params), "loss")


def _norm64(tree: dict[str, Tensor]) -> float:
    """Global Euclidean norm in float64, one leaf at a time (no float64 copy of the whole tree), one all_reduce.

    ``DTensor`` leaves contribute their local shards, summed over ranks; plain leaves (replicated,
    identical on every rank) are added once, after the reduction.
    """
    local = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    mesh = None
    for v in tree.values():
        if isinstance(v, DTensor):
            mesh = v.device_mesh
            local = local + torch.linalg.vector_norm(v.to_local(), dtype=torch.float64) ** 2
        else:
            replicated = replicated + torch.linalg.vector_norm(v, dtype=torch.float64) ** 2
    if mesh is not None:
        torch.distributed.all_reduce(local, group=mesh.get_group())
    return float(torch.sqrt(local.cpu() + replicated.cpu()))


def _full(t: Tensor) -> Tensor:
    """The whole tensor: a ``DTensor`` all-gathered, a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _dt(t: Tensor) -> DTensor:
    assert isinstance(t, DTensor)  # narrowing for mypy: autograd through DTensor returns DTensors
    return t


class _Call(nn.Module):
    """``forward(hparams, *batch) = loss(net, hparams, *batch)``, so functional_call can swap ``net``'s tensors."""

    def __init__(self, net: nn.Module, loss: ShardedLoss):
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, hparams: dict[str, Tensor], *batch: Any) -> Tensor:
        return self.loss(self.net, hparams, *batch)


class ShardedHessianOperator(LinearOperator):
    r"""The Hessian of a loss of a ``fully_shard``-ed module, as a matvec on sharded trees.

    .. math:: v \mapsto \nabla^2_{\theta\theta}\, \bar f(\theta, \lambda)\, v,\qquad
        \bar f = \frac{1}{R}\sum_{r=1}^R f(\theta, \lambda; B_r)

    ``v`` and the result are ``{name: DTensor}`` trees sharded like the parameters (see
    :func:`~hypergrad.fsdp.shard_like`); with :func:`hypergrad.tree_vdot` reducing their inner
    products across ranks, any hypergrad solver (``hypergrad.CG``) solves with it unchanged.
    :meth:`mixed` gives the mixed product :math:`(\partial^2_{\lambda\theta}\bar f) v` that
    implicit differentiation needs. See the module docstring for the four ``mode`` s.

    Args:
        module: the ``fully_shard``-ed module; its parameters are the point :math:`\theta` (the
            finite-difference modes perturb them in place and restore them exactly).
        loss: ``loss(module, hparams, *batch) -> scalar``, the mean over this rank's batch.
        batch: this rank's batch (a tuple of tensors, batch dimension first); every rank must
            hold the same number of samples.
        hparams: plain tensors :math:`\lambda`, identical on every rank (``None`` for none).
        mode: ``"finite_diff"``, ``"finite_diff_cached"``, ``"exact"`` or ``"exact_gathered"``.
        keys: the parameters the Hessian is taken over (the others held fixed); default all
            trainable ones.
        dense_module: for ``mode="exact"`` or ``"exact_gathered"``: an unsharded module of the same architecture (its
            values are never read, so the meta device is fine).

    Example:
        >>> import torch
        >>> from hypergrad.fsdp import ShardedHessianOperator
        >>> ShardedHessianOperator(torch.nn.Linear(2, 1), lambda m, h, x: m(x).mean(), (torch.ones(1, 2),), mode="fwd_rev")
        Traceback (most recent call last):
        ...
        ValueError: ShardedHessianOperator: `mode` must be one of ('finite_diff', 'finite_diff_cached', 'exact', 'exact_gathered') under FSDP2, got 'fwd_rev'. torch.func transforms cannot see through fully_shard: use mode='exact' (double backward through DTensor) or 'finite_diff'.
    """

    def __init__(
        self,
        module: nn.Module,
        loss: ShardedLoss,
        batch: Sequence[Any],
        hparams: Optional[dict[str, Tensor]] = None,
        *,
        mode: ShardedHVPMode = "finite_diff",
        keys: Optional[Sequence[str]] = None,
        dense_module: Optional[nn.Module] = None,
    ):
        if mode not in SHARDED_HVP_MODES:
            raise ValueError(
                f"ShardedHessianOperator: `mode` must be one of {SHARDED_HVP_MODES} under FSDP2, got {mode!r}. "
                "torch.func transforms cannot see through fully_shard: use mode='exact' (double backward through "
                "DTensor) or 'finite_diff'."
            )
        self.module, self.loss, self.mode = module, loss, mode
        self.batch = tuple(batch)
        self.hparams = {k: v.detach() for k, v in (hparams or {}).items()}
        for k, v in self.hparams.items():
            if isinstance(v, DTensor):
                raise TypeError(f"`hparams[{k!r}]` is a DTensor; pass outer parameters as plain replicated tensors.")
        self.params = sharded_params(module, keys)
        self.keys = list(self.params)
        #: the dtype the forward pass computes in (``MixedPrecisionPolicy.param_dtype`` if set); the
        #: finite-difference step is chosen from its machine epsilon
        self.compute_dtype = compute_dtype(module, self.params)
        self.num_backward = 0
        if mode in ("exact", "exact_gathered"):
            if dense_module is None:
                raise ValueError(
                    f"ShardedHessianOperator: mode={mode!r} needs `dense_module`, an unsharded module with the same "
                    "architecture (e.g. the constructor called under `torch.device('meta')`); or use mode='finite_diff'."
                )
            check_dense_module(dense_module, self.params)
            if mode == "exact":
                self._build_graph(dense_module)
            else:
                self._build_gathered(dense_module)
        else:
            theta = {k: p.detach() for k, p in self.params.items()}
            self._theta_norm = _norm64(theta)
            if mode == "finite_diff_cached":
                _, self._g0, self._gh0 = self._grads()

    # ----- finite differences -------------------------------------------------------------
    def _grads(self) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        self.num_backward += 1
        return _backward_grads(self.module, self.loss, self.batch, self.hparams, self.keys, "loss")

    def _at(self, u: dict[str, Tensor], step: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Gradients at ``theta + step * u`` (parameters restored bit for bit afterwards)."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.add_(u[k].to(p.dtype), alpha=step)
            _, g, gh = self._grads()
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])
        return g, gh

    def _fd(self, v: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        check_sharded_like("v", v, self.params)
        nv = _norm64(v)
        if nv == 0.0 or nv != nv:
            zero = {k: torch.zeros_like(p) for k, p in self.params.items()}
            if nv != nv:
                zero = {k: torch.full_like(p, float("nan")) for k, p in self.params.items()}
            return zero, {k: torch.zeros_like(h) for k, h in self.hparams.items()}
        u = {k: x / nv for k, x in v.items()}
        eps_mach = torch.finfo(self.compute_dtype).eps  # bf16 compute under a MixedPrecisionPolicy: a larger step
        if self.mode == "finite_diff":
            eps = eps_mach ** (1.0 / 3.0) * (1.0 + self._theta_norm)
            gp, hp = self._at(u, eps)
            gm, hm = self._at(u, -eps)
            scale = nv / (2.0 * eps)
        else:
            eps = eps_mach**0.5 * (1.0 + self._theta_norm)
            gp, hp = self._at(u, eps)
            gm, hm = self._g0, self._gh0
            scale = nv / eps
        hv = {k: (gp[k] - gm[k]) * scale for k in self.keys}
        mixed = {k: (hp[k] - hm[k]) * scale for k in self.hparams}
        return hv, mixed

    # ----- exact: double backward through DTensor -----------------------------------------
    def _build_graph(self, dense_module: nn.Module) -> None:
        named = dict(self.module.named_parameters())
        mesh = mesh_of(named)
        tensors: dict[str, Tensor] = {}
        self._leaves = {}
        for k, p in named.items():
            # a replicated (plain) parameter of a mixed module enters the DTensor graph as Replicate
            leaf = p.detach() if isinstance(p, DTensor) else DTensor.from_local(p.detach(), mesh, [Replicate()])
            if k in self.params:
                leaf = leaf.requires_grad_(True)
                self._leaves[k] = leaf
            tensors["net." + k] = leaf
        for k, b in self.module.named_buffers():
            tensors["net." + k] = b if isinstance(b, DTensor) else DTensor.from_local(b.detach(), mesh, [Replicate()])
        self._hleaves = {
            k: DTensor.from_local(v, mesh, [Replicate()]).requires_grad_(True) for k, v in self.hparams.items()
        }
        batch = tuple(
            DTensor.from_local(t, mesh, [Shard(0)]) if isinstance(t, Tensor) and not isinstance(t, DTensor) else t
            for t in self.batch
        )
        with torch.enable_grad(), second_order():  # attention on the twice-differentiable MATH backend
            value = _check_loss_value(
                functional_call(_Call(dense_module, self.loss), tensors, (self._hleaves, *batch)), "loss"
            )
            # Seeded with ones that require grad, as in hypergrad.operators: a @once_differentiable
            # backward then leaves its error node in the graph, which is refused below.
            seed = torch.ones_like(value).requires_grad_(True)
            g = torch.autograd.grad(value, list(self._leaves.values()), grad_outputs=seed, create_graph=True)
            # the gradient of a replicated parameter, made Replicate (differentiably) for the products' cotangents
            self._g = tuple(
                gk if isinstance(self.params[k], DTensor) else _dt(gk).redistribute(mesh, [Replicate()])
                for k, gk in zip(self._leaves, g)
            )
        _refuse_once_differentiable(self._g)
        self._mesh = mesh
        self.num_backward += 1

    def _exact(self, v: dict[str, Tensor], hparams: bool) -> dict[str, Tensor]:
        check_sharded_like("v", v, self.params)
        inputs = list(self._hleaves.values()) if hparams else list(self._leaves.values())
        if not inputs:
            return {}
        with second_order():
            grads = torch.autograd.grad(
                self._g,
                inputs,
                grad_outputs=[self._cotangent(k, v[k]) for k in self.keys],
                retain_graph=True,
                allow_unused=True,
            )
        self.num_backward += 1
        if hparams:
            return {
                k: torch.zeros_like(h) if g is None else _dt(g).full_tensor()
                for (k, h), g in zip(self.hparams.items(), grads)
            }
        out = {}
        for k, g in zip(self.keys, grads):
            p = self.params[k]
            if g is None:
                out[k] = torch.zeros_like(p)
            elif isinstance(p, DTensor):
                out[k] = _dt(g).redistribute(p.device_mesh, p.placements).detach()
            else:
                out[k] = _dt(g).full_tensor().detach()
        return out

    # ----- exact on gathered weights: plain double backward per rank, products averaged ------------
    def _build_gathered(self, dense_module: nn.Module) -> None:
        named = dict(self.module.named_parameters())
        self._mesh = mesh_of(named)
        # the twin normalises, drops out, ... as the sharded module does (the same module names)
        modes = {n: m.training for n, m in self.module.named_modules()}
        for n, m in dense_module.named_modules():
            if n in modes:
                m.train(modes[n])
        tensors: dict[str, Tensor] = {}
        self._leaves = {}
        for k, p in named.items():
            full = _full(p).detach()
            if k in self.params:
                full = full.clone().requires_grad_(True)
                self._leaves[k] = full
            tensors["net." + k] = full
        for k, b in self.module.named_buffers():  # copies: train-mode BatchNorm must not move the module's statistics
            tensors["net." + k] = _full(b).detach().clone()
        self._hleaves = {k: v.clone().requires_grad_(True) for k, v in self.hparams.items()}
        with torch.enable_grad(), second_order():  # attention on the twice-differentiable MATH backend
            value = _check_loss_value(
                functional_call(_Call(dense_module, self.loss), tensors, (self._hleaves, *self.batch)), "loss"
            )
            seed = torch.ones_like(value).requires_grad_(True)  # as in the exact route: refuse once_differentiable
            self._g = torch.autograd.grad(value, list(self._leaves.values()), grad_outputs=seed, create_graph=True)
        _refuse_once_differentiable(self._g)
        self.num_backward += 1

    def _gathered(self, v: dict[str, Tensor], hparams: bool) -> dict[str, Tensor]:
        check_sharded_like("v", v, self.params)
        inputs = list(self._hleaves.values()) if hparams else list(self._leaves.values())
        if not inputs:
            return {}
        full = [_full(v[k]).to(self._leaves[k].dtype) for k in self.keys]
        with second_order():
            grads = torch.autograd.grad(self._g, inputs, grad_outputs=full, retain_graph=True, allow_unused=True)
        self.num_backward += 1
        names = list(self.hparams) if hparams else self.keys
        refs = self.hparams if hparams else self._leaves
        mean = all_reduce_mean(
            {k: torch.zeros_like(refs[k]) if g is None else g.detach() for k, g in zip(names, grads)}
        )
        if hparams:
            return mean
        out = {}
        for k in self.keys:
            p = self.params[k]
            # every rank holds the same averaged product: each keeps its own shard, no communication
            out[k] = (
                distribute_tensor(mean[k], p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor)
                else mean[k]
            )
        return out

    def _cotangent(self, k: str, v: Tensor) -> Tensor:
        v = v.to(self.params[k].dtype)
        return v if isinstance(v, DTensor) else DTensor.from_local(v, self._mesh, [Replicate()])

    # ----- public ---------------------------------------------------------------------------
    def matvec(self, v: Any) -> Any:
        """Return :math:`\\nabla^2_{\\theta\\theta}\\bar f\\, v`, sharded like the parameters.

        Args:
            v: ``{name: DTensor}`` sharded like the parameters (over :attr:`keys`).

        Returns:
            A detached ``{name: DTensor}`` tree sharded like ``v``.
        """
        if self.mode == "exact":
            return self._exact(v, hparams=False)
        if self.mode == "exact_gathered":
            return self._gathered(v, hparams=False)
        return self._fd(v)[0]

    def mixed(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""The mixed product :math:`(\partial^2_{\lambda\theta}\bar f)\, v = \nabla_\lambda\langle\nabla_\theta \bar f, v\rangle`.

        Args:
            v: ``{name: DTensor}`` sharded like the parameters.

        Returns:
            A plain tree keyed like ``hparams``, identical on every rank.
        """
        if self.mode == "exact":
            return self._exact(v, hparams=True)
        if self.mode == "exact_gathered":
            return self._gathered(v, hparams=True)
        return self._fd(v)[1]
