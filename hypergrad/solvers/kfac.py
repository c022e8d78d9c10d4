r"""K-FAC preconditioning for :class:`~hypergrad.solvers.PCG`: Kronecker-factored curvature per layer.

Unlike :class:`~hypergrad.solvers.HutchinsonDiagonal` and :class:`~hypergrad.solvers.Nystrom`,
which see only the operator, :class:`KFAC` reads the network's structure: it runs the model once
on the Hessian batch (forward hooks on its ``nn.Linear`` / ``nn.Conv2d`` layers) and backpropagates
a few vectors through it, then inverts a Kronecker-factored Gauss-Newton approximation of each
layer's block exactly in the factors' eigenbasis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_positive
from .._typing import MatVec, TreeOrTensor
from ..modules import BUFFER_POLICIES, module_params, stateless
from ._lanczos import flat_matvec
from .preconditioners import AbstractPreconditioner, BuiltPreconditioner, hutchinson_estimate

__all__ = ["KFAC", "KFACBuilt"]

LOSSES = ("cross_entropy", "mse")
FISHERS = ("type2", "mc", "empirical")
OTHERS = ("identity", "hutchinson")
SHARINGS = ("expand", "reduce")


@dataclass
class KFACBuilt(BuiltPreconditioner):
    """A built :class:`KFAC` preconditioner, with its construction cost in network passes.

    Attributes:
        forward_passes: forward passes of the model spent building it (1).
        backward_passes: backward passes (one per backpropagated column: the number of classes for
            ``fisher="type2"``, ``num_samples`` for ``"mc"``, 1 for ``"empirical"``).
        layers: names of the Kronecker-factored layers (the rest of the parameters are diagonal).
    """

    forward_passes: int = 0
    backward_passes: int = 0
    layers: tuple[str, ...] = ()


@dataclass
class _Layer:
    """One tracked layer: its flat slices and its recorded inputs (rows) and output gradients."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    acts: list[Tensor] = field(default_factory=list)  # per call: (N, T, in[+1])
    outs: list[Tensor] = field(default_factory=list)  # per call: layer output (in the graph)
    grads: list[list[Tensor]] = field(default_factory=list)  # per call, per column: (N, T, out)


@dataclass(frozen=True)
class KFAC(AbstractPreconditioner):
    r"""K-FAC preconditioning of :math:`\sigma I + s\,H` (``shift`` :math:`\sigma`, ``scale`` :math:`s`).

    For each ``nn.Linear`` / ``nn.Conv2d`` layer :math:`l` whose weight is in the right-hand side,
    the Gauss-Newton block of the loss :math:`L = \frac1N\sum_n \ell(z_n)` (``z_n`` the model's
    output on example :math:`n`, :math:`\nabla^2_z\ell = S_n S_n^\top`) is approximated by a
    Kronecker product (weight laid out ``(out, in)``, the bias appended as a last input column):

    .. math::

        H_l \approx G_l \otimes A_l,\qquad
        A_l = \frac{1}{NT}\sum_{n,t} a_{n,t} a_{n,t}^\top,\qquad
        G_l = \frac1N\sum_{n,t,c} g_{n,t,c}\, g_{n,t,c}^\top,

    :math:`a_{n,t}` the layer's input at position :math:`t` (``[x; 1]`` with a bias; a conv's
    unfolded patches: KFC's "expand" approximation, Grosse & Martens 2016), :math:`g_{n,t,c}` the
    gradient of :math:`\langle S_n e_c, z_n\rangle` with respect to the layer's output there.
    ``sharing="reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023) merges the positions first,
    :math:`A_l = \frac1N\sum_n \bar a_n \bar a_n^\top` with :math:`\bar a_n = \frac1T\sum_t a_{n,t}`
    and :math:`G_l = \frac1N\sum_{n,c} \bar g_{n,c}\bar g_{n,c}^\top` with
    :math:`\bar g_{n,c} = \sum_t g_{n,t,c}` (the same for :math:`T = 1`); it keeps the
    correlation between positions that "expand" drops (a global average pool makes it large). With
    :math:`A_l = Q_A \operatorname{diag}(\alpha) Q_A^\top` and
    :math:`G_l = Q_G \operatorname{diag}(\gamma) Q_G^\top`, the block of :math:`M^{-1}` is exact:

    .. math::

        M_l^{-1} R = Q_G\Big[(Q_G^\top R\, Q_A) \oslash (\sigma + s\,\gamma\alpha^\top)\Big] Q_A^\top .

    ``correction=True`` (EK-FAC, George et al. 2018) replaces :math:`\gamma_i\alpha_j` by the
    Gauss-Newton diagonal in that eigenbasis, :math:`\frac1N\sum_{n,c}
    \big(Q_G^\top \nabla_W \langle S_n e_c, z_n\rangle\, Q_A\big)_{ij}^2` from per-example gradients.
    Every other parameter of the right-hand side (normalisation affines, biases of untracked
    layers, grouped or ``padding="same"`` convolutions) is preconditioned by :math:`1/\sigma`
    (``others="identity"``) or by the inverse of a Hutchinson estimate of the operator's diagonal
    (``others="hutchinson"``, ``hutchinson_samples`` matvecs).

    :math:`S_n` (``fisher``): ``"type2"``, the exact Gauss-Newton factor (cross-entropy:
    :math:`S_n = \operatorname{diag}(\sqrt{p_n}) - p_n\sqrt{p_n}^\top`, one backward pass per
    class; MSE: :math:`\sqrt{2/D}\,I`, one per output); ``"mc"``, ``num_samples`` Monte-Carlo
    columns (labels sampled from the model's predictive :math:`p_n` for cross-entropy, Gaussian for
    MSE): the Fisher, unbiased; ``"empirical"``, the gradient at the given ``targets`` (the
    empirical Fisher, which is not the Gauss-Newton matrix). The Gauss-Newton matrix is positive
    semi-definite: the negative curvature of an indefinite Hessian is not captured.

    **What it needs.** The solver protocol gives a preconditioner only the operator and a
    right-hand side, so the model and the Hessian batch are given here: ``model`` (run through
    :func:`~hypergrad.stateless` with ``buffers``), ``inputs`` and ``params``, a callable returning
    the parameter tree at which the operator is taken (default: the module's own parameters at
    build time). The right-hand side must be a dict keyed by parameter names of ``model``.
    :class:`~hypergrad.solvers.PCG` builds it once per operator object (every new operator, e.g.
    each alternation, calls ``params`` again). Cost: one forward pass and ``backward_passes``
    backward passes (reported on the built object, :class:`KFACBuilt`), and no matvec unless
    ``others="hutchinson"``; ``num_matvecs`` counts only matvecs.

    Args:
        model: the network (``nn.Module``) whose Hessian the operator is.
        inputs: the Hessian batch's inputs (first dimension the batch).
        params: ``() -> {name: tensor}``, the point; ``None`` reads ``model``'s parameters.
        loss: ``"cross_entropy"`` (mean over the batch, logits ``(N, C)``) or ``"mse"`` (mean over
            all output elements).
        fisher: ``"type2"``, ``"mc"`` or ``"empirical"`` (see above).
        targets: labels (cross-entropy) or targets (MSE); only for ``fisher="empirical"``.
        shift: :math:`\sigma > 0` (1 for ``I + H/lam``).
        scale: :math:`s > 0` (``1/lam`` for ``I + H/lam``).
        num_samples: Monte-Carlo columns for ``fisher="mc"`` (>= 1).
        correction: EK-FAC eigenvalue correction (from the exact per-example gradients
            :math:`\sum_t g_{n,t,c} a_{n,t}^\top`, whichever ``sharing``).
        sharing: ``"expand"`` or ``"reduce"``: the approximation over weight-sharing positions
            (convolution positions; a linear layer's extra input dimensions).
        others: ``"identity"`` or ``"hutchinson"`` for the parameters outside the tracked layers.
        hutchinson_samples: probes for ``others="hutchinson"`` (>= 1).
        buffers: the buffer policy of :func:`~hypergrad.stateless` (use the operator's).
        seed: seed of the Monte-Carlo labels and the Hutchinson probes.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import hypergrad
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Linear(6, 4).double()  # multinomial logistic regression: H is the Gauss-Newton matrix
        >>> x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
        >>> f, params = hypergrad.stateless(net), hypergrad.module_params(net)
        >>> H = hypergrad.HessianOperator(lambda p: F.cross_entropy(f(p, x), y), params)
        >>> op = hypergrad.Damped(H, 1e-3)  # 1e-3 I + H
        >>> solve = hypergrad.PCG(hypergrad.KFAC(net, x, shift=1e-3), max_steps=200, rtol=1e-8)
        >>> cold = hypergrad.CG(max_steps=200, rtol=1e-8)
        >>> pcg, cg = solve(op, params), cold(op, params)
        >>> pcg.converged and cg.converged, pcg.num_steps < cg.num_steps, pcg.stats["setup_matvecs"]
        (True, True, 0)

    References:
        Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored approximate curvature.
        Grosse & Martens (2016), A Kronecker-factored approximate Fisher matrix for convolution layers.
        Eschenhagen et al. (2023), Kronecker-factored approximate curvature for modern neural network
        architectures.
        George et al. (2018), Fast approximate natural gradient descent in a Kronecker-factored eigenbasis.
    """

    model: nn.Module = field(compare=False)
    inputs: Tensor = field(compare=False)
    params: Callable[[], Mapping[str, Tensor]] | None = field(default=None, compare=False)
    loss: str = "cross_entropy"
    fisher: str = "type2"
    targets: Tensor | None = field(default=None, compare=False)
    shift: float = 1.0
    scale: float = 1.0
    num_samples: int = 1
    correction: bool = False
    sharing: str = "expand"
    others: str = "identity"
    hutchinson_samples: int = 8
    buffers: str = "batch_stats"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"KFAC: `model` must be an nn.Module, got {type(self.model).__name__}.")
        if not isinstance(self.inputs, Tensor):
            raise TypeError(
                f"KFAC: `inputs` must be the Hessian batch's input Tensor, got {type(self.inputs).__name__}."
            )
        if self.params is not None and not callable(self.params):
            raise TypeError(
                "KFAC: `params` must be a callable () -> {name: tensor} returning the current point "
                f"(e.g. lambda: state.params), got {type(self.params).__name__}."
            )
        check_choice("loss", self.loss, LOSSES, owner="KFAC")
        check_choice("fisher", self.fisher, FISHERS, owner="KFAC")
        check_choice("others", self.others, OTHERS, owner="KFAC")
        check_choice("sharing", self.sharing, SHARINGS, owner="KFAC")
        check_choice("buffers", self.buffers, BUFFER_POLICIES, owner="KFAC")
        if self.fisher == "empirical" and self.targets is None:
            raise ValueError("KFAC: fisher='empirical' needs `targets` (the Hessian batch's labels or targets).")
        if self.targets is not None and not isinstance(self.targets, Tensor):
            raise TypeError(f"KFAC: `targets` must be a Tensor or None, got {type(self.targets).__name__}.")
        check_positive("shift", self.shift, owner="KFAC")
        check_positive("scale", self.scale, owner="KFAC")
        check_int("num_samples", self.num_samples, owner="KFAC")
        check_int("hutchinson_samples", self.hutchinson_samples, owner="KFAC")
        check_int("seed", self.seed, minimum=0, owner="KFAC")
        if not isinstance(self.correction, bool):
            raise TypeError(f"KFAC: `correction` must be a bool, got {self.correction!r}.")

    def build(self, matvec: MatVec, b: TreeOrTensor) -> KFACBuilt:
        if not isinstance(b, Mapping):
            raise TypeError(
                "KFAC: the right-hand side `b` must be a dict keyed by the model's parameter names "
                f"(K-FAC needs to know which entries belong to which layer), got {type(b).__name__}."
            )
        point = dict(self.params() if self.params is not None else module_params(self.model))
        unknown = [k for k in b if k not in point]
        if unknown:
            raise ValueError(
                f"KFAC: right-hand side keys {unknown} are not parameters of the point "
                f"({'params()' if self.params is not None else 'model.named_parameters()'}); "
                "pass `params` returning the tree the operator differentiates."
            )
        keys = list(b.keys())
        sizes = [b[k].numel() for k in keys]
        offsets = dict(zip(keys, zip([0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]], sizes)))
        ref = b[keys[0]]
        layers = self._layers(b)
        fwd, bwd = self._record(layers, point)
        blocks, finite = self._blocks(layers, ref.dtype)
        covered = {k for lay in layers for k in (lay.weight, lay.bias) if k is not None}
        rest = [k for k in keys if k not in covered]
        n = sum(sizes)
        mask = torch.zeros(n, dtype=torch.bool, device=ref.device)
        for k in rest:
            s, m = offsets[k]
            mask[s : s + m] = True
        diag, used = self._diagonal(matvec, b, mask, n, ref)
        finite = finite and bool(torch.isfinite(diag).all())
        shapes = [(offsets[lay.weight], offsets[lay.bias] if lay.bias else None) for lay in layers]

        def apply(r: Tensor) -> Tensor:
            out = torch.where(mask, r / diag, torch.zeros_like(r))
            for ((ws, wn), bias), (QG, QA, denom) in zip(shapes, blocks):
                rows = QG.shape[0]
                R = r[ws : ws + wn].reshape(rows, -1)
                if bias is not None:
                    R = torch.cat([R, r[bias[0] : bias[0] + bias[1]].reshape(rows, 1)], dim=1)
                X = QG @ ((QG.T @ R @ QA) / denom) @ QA.T
                out[ws : ws + wn] = X[:, : wn // rows].reshape(-1)
                if bias is not None:
                    out[bias[0] : bias[0] + bias[1]] = X[:, -1]
            return out

        return KFACBuilt(apply, used, finite, True, fwd, bwd, tuple(lay.name for lay in layers))

    def _layers(self, b: Mapping[str, Tensor]) -> list[_Layer]:
        out = []
        for name, m in self.model.named_modules():
            pre = f"{name}." if name else ""
            w, bias = f"{pre}weight", f"{pre}bias"
            if w not in b:
                continue
            if isinstance(m, nn.Conv2d):
                if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
                    continue  # grouped / 'same' / non-zero padding: left to the diagonal part
            elif not isinstance(m, nn.Linear):
                continue
            out.append(_Layer(name or "<root>", m, w, bias if bias in b and m.bias is not None else None))
        return out

    def _record(self, layers: list[_Layer], point: dict[str, Tensor]) -> tuple[int, int]:
        """Forward with hooks (layer inputs as rows), then backpropagate the columns of S; returns passes."""

        def hook(lay: _Layer) -> Callable[..., None]:
            def record(mod: nn.Module, inp: tuple[Any, ...], out: Tensor) -> None:
                x = inp[0].detach()
                n = x.shape[0]
                if isinstance(mod, nn.Conv2d):
                    pad = cast(tuple[int, ...], mod.padding)  # a string padding is not tracked (_layers)
                    a = F.unfold(x, mod.kernel_size, mod.dilation, pad, mod.stride).transpose(1, 2)
                else:
                    a = x.reshape(n, -1, x.shape[-1])
                if lay.bias is not None:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                lay.acts.append(a)
                lay.outs.append(out)

            return record

        handles = [lay.module.register_forward_hook(hook(lay)) for lay in layers]
        f = stateless(self.model, buffers=self.buffers)  # type: ignore[arg-type]
        p = {k: v.detach().requires_grad_(True) for k, v in point.items()}
        try:
            with torch.enable_grad():
                z = f(p, self.inputs)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(z, Tensor) or z.dim() < 1:
            raise TypeError(f"KFAC: the model must return one output Tensor (batch first), got {type(z).__name__}.")
        if self.loss == "cross_entropy" and z.dim() != 2:
            raise ValueError(
                f"KFAC: loss='cross_entropy' needs logits of shape (N, C), got {tuple(z.shape)}; "
                "use loss='mse' or reshape the model's output."
            )
        N = z.shape[0]
        z2 = z.reshape(N, -1)
        cols = self._columns(z2.detach())
        outs = [o for lay in layers for o in lay.outs]
        for lay in layers:
            lay.grads = [[] for _ in lay.outs]
        for w, V in cols:
            gs = torch.autograd.grad(z2, outs, grad_outputs=V, retain_graph=True, allow_unused=True)
            it = iter(gs)
            for lay in layers:
                for i, o in enumerate(lay.outs):
                    g = next(it)
                    g = torch.zeros_like(o) if g is None else g
                    if isinstance(lay.module, nn.Conv2d):
                        g = g.reshape(N, g.shape[1], -1).transpose(1, 2)
                    else:
                        g = g.reshape(N, -1, g.shape[-1])
                    lay.grads[i].append(math.sqrt(w) * g.detach())
        for lay in layers:
            lay.outs = []
        return 1, len(cols)

    def _columns(self, z: Tensor) -> list[tuple[float, Tensor]]:
        """``(weight, V)``: the backpropagated columns ``V[n] = S_n e_c`` with their weights."""
        N, D = z.shape
        gen = torch.Generator().manual_seed(self.seed)
        if self.loss == "cross_entropy":
            p = torch.softmax(z, dim=1)
            if self.fisher == "type2":
                eye = torch.eye(D, dtype=z.dtype, device=z.device)
                return [(1.0, p[:, c : c + 1].sqrt() * (eye[c] - p)) for c in range(D)]
            if self.fisher == "mc":
                out = []
                for _ in range(self.num_samples):
                    y = torch.multinomial(p.cpu(), 1, generator=gen).squeeze(1).to(z.device)
                    out.append((1.0 / self.num_samples, p - F.one_hot(y, D).to(z.dtype)))
                return out
            y = self._targets(N).reshape(-1).long()
            return [(1.0, p - F.one_hot(y, D).to(z.dtype))]
        c2 = math.sqrt(2.0 / D)
        if self.fisher == "type2":
            eye = torch.eye(D, dtype=z.dtype, device=z.device)
            return [(1.0, c2 * eye[c].expand(N, D)) for c in range(D)]
        if self.fisher == "mc":
            return [
                (1.0 / self.num_samples, c2 * torch.randn(N, D, generator=gen, dtype=z.dtype).to(z.device))
                for _ in range(self.num_samples)
            ]
        return [(1.0, (2.0 / D) * (z - self._targets(N).reshape(N, -1).to(z.dtype)))]

    def _targets(self, n: int) -> Tensor:
        t = self.targets
        if t is None:  # refused in __post_init__; kept for the type checker
            raise ValueError("KFAC: fisher='empirical' needs `targets`.")
        if t.shape[0] != n:
            raise ValueError(
                f"KFAC: `targets` has {t.shape[0]} rows but the model's output has {n}; pass the Hessian batch's targets."
            )
        return t

    def _blocks(self, layers: list[_Layer], dtype: torch.dtype) -> tuple[list[tuple[Tensor, Tensor, Tensor]], bool]:
        """Per layer ``(Q_G, Q_A, sigma + s * D)``; ``False`` when a factor is not finite."""
        blocks, finite = [], True
        for lay in layers:
            a = torch.cat(lay.acts, dim=1)  # (N, T, in')
            N, T = a.shape[0], a.shape[1]
            if self.sharing == "reduce":  # positions merged first: mean of inputs, sum of gradients
                ar = a.mean(1)
                A = ar.T @ ar / N
            else:
                A = torch.einsum("nti,ntj->ij", a, a) / (N * T)
            cols = [torch.cat([g[k] for g in lay.grads], dim=1) for k in range(len(lay.grads[0]))]
            if self.sharing == "reduce":
                G = sum(g.sum(1).T @ g.sum(1) for g in cols) / N
            else:
                G = sum(torch.einsum("nti,ntj->ij", g, g) for g in cols) / N
            A64, G64 = A.to(torch.float64), torch.as_tensor(G).to(torch.float64)
            if not (bool(torch.isfinite(A64).all()) and bool(torch.isfinite(G64).all())):
                finite = False
                A64, G64 = torch.zeros_like(A64), torch.zeros_like(G64)
            alpha, QA = torch.linalg.eigh(0.5 * (A64 + A64.T))
            gamma, QG = torch.linalg.eigh(0.5 * (G64 + G64.T))
            if self.correction:
                QGd, QAd = QG.to(a.dtype), QA.to(a.dtype)
                at = a @ QAd
                D = sum(torch.einsum("nto,nti->noi", g @ QGd, at).square().sum(0) for g in cols) / N
                D = torch.as_tensor(D).to(torch.float64)
            else:
                D = torch.clamp(gamma, min=0.0)[:, None] * torch.clamp(alpha, min=0.0)[None, :]
            denom = self.shift + self.scale * D
            blocks.append((QG.to(dtype), QA.to(dtype), denom.to(dtype)))
            lay.acts, lay.grads = [], []
        return blocks, finite

    def _diagonal(
        self, matvec: MatVec, b: Mapping[str, Tensor], mask: Tensor, n: int, ref: Tensor
    ) -> tuple[Tensor, int]:
        """The diagonal used outside the tracked layers: ``shift`` or a clamped Hutchinson estimate."""
        ones = torch.full((n,), self.shift, dtype=ref.dtype, device=ref.device)
        if self.others == "identity" or not bool(mask.any()):
            return ones, 0
        # probes on the diagonal part only
        d = hutchinson_estimate(flat_matvec(matvec, dict(b)), ones, self.hutchinson_samples, self.seed, mask)
        floor = 1e-3 * float(d[mask].abs().mean()) if bool(torch.isfinite(d).all()) else 0.0
        d = torch.clamp(d, min=floor if floor > 0 else self.shift)
        return torch.where(mask, d, ones), self.hutchinson_samples
