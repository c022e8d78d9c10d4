r"""Linear operators built with ``torch.func``: Hessian-vector products and friends.

All operators act on parameter trees (``dict[str, Tensor]``) and are plain callables ``v -> A v``,
so any :mod:`hypergrad.solvers` solver accepts them. Their outputs are detached: the solvers need
values, not graphs.

HVP modes (``mode=``):

* ``"fwd_rev"``: forward-over-reverse, :math:`Hv = \partial_\epsilon \nabla f(\theta + \epsilon v)`
  via ``jvp(grad(f))``, recomputed on each call. The least memory of the exact modes.
* ``"fwd_rev_linearized"``: forward-over-reverse with the linearisation of :math:`\nabla f`
  computed once, when the operator is constructed (``torch.func.linearize``: one traced forward and
  backward pass whose tangent program is kept); every call runs only that tangent program. Exact;
  building it costs hundreds of gradients in this torch on CPU (tracing and constant folding), so
  it pays off only for many products at one point (an operator reused across upper steps).
* ``"rev_rev"``: reverse-over-reverse, ``vjp(grad(f))`` recomputed on each call. Covers operators
  that lack forward-mode rules.
* ``"rev_rev_cached"``: reverse-over-reverse with the gradient graph built once, when the operator
  is constructed, and reused by every call: one backward pass per HVP, no forward re-run, at the
  price of keeping the graph alive. The fastest exact mode measured (``docs/benchmarks.md``). Its
  peak is that of ``"rev_rev"`` plus up to the tensors the first backward saves for the second
  (about one more copy of the activations): during each product the double backward fills a
  gradient buffer for every saved activation before it can use any, which a one-off double
  backward offsets by freeing the first backward's tensors as it goes, and a kept graph cannot
  (1.2-1.3x on the BiSSL ResNet; ``tests/test_operator_memory.py`` bounds it).
* ``"finite_diff"``: central differences of gradients, :math:`(\nabla f(\theta+\epsilon v) -
  \nabla f(\theta-\epsilon v)) / 2\epsilon`: two gradients, no second-order AD at all, about
  :math:`\epsilon_{\text{mach}}^{2/3}` relative accuracy.
* ``"auto"`` (the default): the fastest exact mode that fits in memory, resolved once per operator,
  on its first product, and never changed afterwards (read it from :attr:`HessianOperator.mode`;
  the choice and its reason are logged on the ``hypergrad`` logger at INFO level):

  1. ``"rev_rev_cached"``, unless the cached graph does not fit: building it runs out of memory,
     or once built it leaves less free memory than its own size (the double backward of each
     product allocates about as much again). Free memory is the CUDA allocator's free plus cached
     bytes on a GPU, ``MemAvailable`` of ``/proc/meminfo`` on a Linux CPU; elsewhere no guard.
  2. ``"fwd_rev"`` (least memory) when the graph does not fit, or, with an
     :class:`HVPFallbackWarning` (never silently), when reverse-over-reverse raises (e.g. a custom
     ``autograd.Function`` whose backward has no backward itself).

  A custom ``autograd.Function`` whose ``backward`` is decorated ``@once_differentiable`` has no
  second derivative by double backward (plain autograd would silently give zero): the reverse modes
  detect it in the gradient graph and raise (``"auto"`` then tries ``"fwd_rev"``, which needs the
  Function's ``jvp`` rule); ``"finite_diff"`` needs only first derivatives.

**Attention.** Every second-order pass (the HVPs of all exact modes, the mixed product, the
fixed-point adjoint) runs under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: the fused
``scaled_dot_product_attention`` kernels (flash, memory-efficient) have neither forward-mode AD nor
double backward, the ``MATH`` backend has both. Models with attention (``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, Hugging Face GPT-2) therefore work in every mode with no action from
the user and no fallback warning. The cost: the ``MATH`` backend materialises the attention matrix,
:math:`O(L S)` memory per head for a second-order pass instead of :math:`O(L)`, and on GPU runs a
few times slower than the fused kernels. First-order passes (losses, gradients, inner steps,
``"finite_diff"`` products) keep the fast kernels.

**Tags.** Every operator carries ``symmetric`` and ``positive_definite`` tags (``True``,
``False`` or ``None`` = unknown); :class:`~hypergrad.CG` refuses an operator tagged
``symmetric=False``.
"""

from __future__ import annotations

import abc
import gc
import logging
import warnings
import weakref
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, cast

import torch
from torch import Tensor
from torch.func import grad, jvp, linearize, vjp

from ._checks import check_callable, check_choice, check_positive, check_tree
from ._second_order import attention_hint, second_order
from ._typing import FixedPointMap, TensorTree, TreeOrTensor
from .tree import tree_axpy, tree_check_like, tree_map, tree_norm, tree_scale, tree_sub

__all__ = [
    "HVP_MODES",
    "HVPMode",
    "LinearOperator",
    "HessianOperator",
    "Damped",
    "FixedPointOperator",
    "hvp",
    "mixed_hvp",
]

HVPMode = Literal["auto", "fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff", "fwd_rev_linearized"]
HVP_MODES: tuple[str, ...] = ("auto", "fwd_rev", "rev_rev", "rev_rev_cached", "finite_diff", "fwd_rev_linearized")
#: The modes that do their one-off work (a graph, a linearisation) at construction and reuse it.
FROZEN_HVP_MODES: tuple[str, ...] = ("rev_rev_cached", "fwd_rev_linearized")

_log = logging.getLogger("hypergrad")


class HVPFallbackWarning(UserWarning):
    """One order of differentiation failed for this function and ``"auto"`` switched to the other.

    ``"auto"`` tries reverse-over-reverse first (the cached graph); when that raises (e.g. a custom
    ``autograd.Function`` without a double backward) it switches to ``"fwd_rev"`` and warns, once
    per :class:`HessianOperator` (or :func:`mixed_hvp` call). Pass ``mode="fwd_rev"`` to skip the
    reverse-mode attempt (and the warning).

    Example:
        >>> import warnings, hypergrad
        >>> warnings.simplefilter("ignore", hypergrad.HVPFallbackWarning)  # silence it
    """


def _check_mode(mode: Any) -> None:
    check_choice("mode", mode, HVP_MODES)


def _detach(tree: Any) -> Any:
    return tree_map(torch.Tensor.detach, tree)


class LinearOperator(abc.ABC):
    r"""A linear map :math:`v \mapsto A v` on parameter trees. Subclasses implement :meth:`matvec`.

    Calling the operator is :meth:`matvec`, so any operator is a ``MatVec`` for the solvers.
    Operators are immutable once built. The class attributes ``symmetric`` and
    ``positive_definite`` tag what is known about :math:`A` (``None``: unknown); solvers that
    assume symmetry (:class:`~hypergrad.CG`) refuse an operator tagged ``symmetric=False``.

    Example:
        >>> import torch
        >>> from hypergrad import LinearOperator
        >>> class Scale(LinearOperator):
        ...     symmetric, positive_definite = True, True
        ...     def matvec(self, v):
        ...         return {k: 2.0 * x for k, x in v.items()}
        >>> Scale()({"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """

    symmetric: Optional[bool] = None
    positive_definite: Optional[bool] = None

    def __call__(self, v: TreeOrTensor) -> TreeOrTensor:
        return self.matvec(v)

    @abc.abstractmethod
    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        """Return :math:`A v`.

        Args:
            v: a tree (or tensor) shaped like the operator's domain.

        Returns:
            :math:`A v`, shaped like ``v``, detached from any autograd graph.
        """

    def matmat(self, V: TreeOrTensor) -> TreeOrTensor:
        r"""Return :math:`A V` for a block of vectors: :math:`[A v_1, \dots, A v_s]`.

        The default applies :meth:`matvec` to each column and stacks the results (correct for every
        operator, ``s`` products); :class:`HessianOperator` overrides it with one batched product,
        :class:`Damped` and :class:`Mapped` pass it through. A block of ``s`` columns counts as
        ``s`` matvecs (HVPs) wherever products are counted (:class:`~hypergrad.BlockCG`).

        Args:
            V: a tree (or tensor) whose every leaf carries a leading block dimension ``s``:
                ``V[k][j]`` is leaf ``k`` of column ``j``.

        Returns:
            :math:`A V`, shaped like ``V``.

        Example:
            >>> import torch
            >>> from hypergrad import Damped
            >>> Damped(lambda v: 2 * v, 1.0).matmat(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            tensor([[3., 0.],
                    [0., 3.]])
        """
        return _loop_matmat(self.matvec, V)


def operator_tags(operator: Any) -> tuple[Optional[bool], Optional[bool]]:
    """``(symmetric, positive_definite)`` of any matvec: its tags, or ``(None, None)`` for a plain callable."""
    return getattr(operator, "symmetric", None), getattr(operator, "positive_definite", None)


def _block_size(V: Any, *, owner: str, name: str = "V", hint: str = "") -> int:
    """The common leading (block) dimension ``s >= 1`` of the leaves of ``V`` (errors name the leaf; ``hint``
    ends the 0-dim one)."""
    leaves = (
        [(f"`{name}`", V)]
        if isinstance(V, Tensor)
        else [(f"`{name}[{k!r}]`", t) for k, t in V.items()]
        if isinstance(V, Mapping)
        else None
    )
    if not leaves or not all(isinstance(t, Tensor) for _, t in leaves):
        raise TypeError(f"{owner}: `{name}` must be a tensor or a non-empty dict of tensors, got {type(V).__name__}.")
    for where, t in leaves:
        if t.dim() == 0:
            raise ValueError(
                f"{owner}: {where} is 0-dim; every leaf needs a leading block dimension s (shape (s, *shape)).{hint}"
            )
    dims = sorted({t.shape[0] for _, t in leaves})
    if len(dims) > 1:
        shapes = {where: tuple(t.shape) for where, t in leaves}
        raise ValueError(
            f"{owner}: every leaf of `{name}` needs the same leading block dimension s >= 1 (one row per column), "
            f"but the leaves have different leading (block) dimensions {dims} (shapes {shapes}); stack the s "
            "columns along dim 0 of every leaf (torch.stack)."
        )
    if dims[0] == 0:
        raise ValueError(f"{owner}: `{name}` has no columns (block dimension 0); pass s >= 1.")
    return int(dims[0])


def _column(V: Any, j: int) -> Any:
    return V[j] if isinstance(V, Tensor) else {k: t[j] for k, t in V.items()}


def _stack_columns(cols: Sequence[Any]) -> Any:
    if isinstance(cols[0], Tensor):
        return torch.stack(list(cols))
    return {k: torch.stack([c[k] for c in cols]) for k in cols[0]}


def _loop_matmat(matvec: Callable[[Any], Any], V: Any, *, owner: str = "matmat") -> Any:
    """``A V`` column by column: one ``matvec`` per column, stacked along dim 0."""
    s = _block_size(V, owner=owner)
    return _stack_columns([matvec(_column(V, j)) for j in range(s)])


def _block_product(operator: Callable[[Any], Any], V: Any) -> Any:
    """``operator.matmat(V)`` when it has one (an operator), else one call per column (a plain callable)."""
    matmat = getattr(operator, "matmat", None)
    return matmat(V) if callable(matmat) else _loop_matmat(operator, V)


def _check_block_direction(V: Any, params: TensorTree, *, owner: str) -> int:
    """``V`` is a block of directions: keys of ``params``, leaves ``(s, *shape)``; returns ``s``."""
    if isinstance(V, Tensor) or not isinstance(V, Mapping):
        got = "a single Tensor" if isinstance(V, Tensor) else type(V).__name__
        raise TypeError(f"{owner}: `V` must be a dict of tensors keyed like `params`, got {got}.")
    s = _block_size(V, owner=owner) if len(V) else 0
    _check_direction("V[0]" if s else "V", _column(V, 0) if s else V, params, owner=owner)
    return s


def _check_direction(name: str, v: Any, params: TensorTree, *, owner: str) -> None:
    """``v`` is a tree with the keys, shapes, dtypes and device of ``params`` (not meta tensors)."""
    if isinstance(v, Tensor) or not isinstance(v, Mapping):
        got = "a single Tensor" if isinstance(v, Tensor) else type(v).__name__
        raise TypeError(f"{owner}: `{name}` must be a dict of tensors keyed like `params`, got {got}.")
    if set(v) != set(params):
        missing, extra = sorted(set(params) - set(v)), sorted(set(v) - set(params))
        raise ValueError(
            f"{owner}: `{name}` must have the keys of `params`; missing {missing}, unexpected {extra}. "
            "Build it with {k: ... for k in params}."
        )
    for k, t in v.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: `{name}[{k!r}]` must be a Tensor, got {type(t).__name__}.")
        p = params[k]
        if t.is_meta or p.is_meta:
            which = name if t.is_meta else "params"
            raise ValueError(
                f"{owner}: `{which}[{k!r}]` is a meta tensor (no data); materialise it on a real device "
                "(e.g. module.to_empty(device='cpu') and load the weights) before differentiating."
            )
        if t.shape != p.shape:
            raise ValueError(
                f"{owner}: `{name}[{k!r}]` has shape {tuple(t.shape)} but `params[{k!r}]` has shape "
                f"{tuple(p.shape)}; a direction must be shaped like the parameters."
            )
        if t.dtype != p.dtype or t.device != p.device:
            raise ValueError(
                f"{owner}: `{name}[{k!r}]` is {t.dtype} on {t.device} but `params[{k!r}]` is {p.dtype} on "
                f"{p.device}; cast it with .to(params[{k!r}])."
            )


def _check_params_real(params: TensorTree, *, owner: str, name: str = "params") -> None:
    """``params`` is a non-empty dict of floating-point tensors (on one device, not meta tensors)."""
    meta = [k for k, t in params.items() if isinstance(t, Tensor) and t.is_meta] if isinstance(params, Mapping) else []
    if meta:
        raise ValueError(
            f"{owner}: `{name}` {meta[:5]} are meta tensors (no data); materialise the module on a real device "
            "(module.to_empty(device=...) then load the weights) before differentiating."
        )
    try:  # also a tensor or a list where a dict belongs (a TypeError naming the argument, not an AttributeError)
        check_tree(name, params, finite=False)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{owner}: {err}") from None


def _check_no_inference_mode(owner: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{owner} was called under torch.inference_mode(), which disables autograd entirely, so no "
            "derivative can be taken. Call it outside the `with torch.inference_mode():` block (`torch.no_grad()` is fine)."
        )


def _check_scalar_output(fn: Callable[..., Any], args: tuple, *, owner: str, err: BaseException) -> None:
    """After a failed product: raise a clear ValueError (from ``err``) if ``fn(*args)`` is not a scalar tensor.

    Runs only on the failure path (one extra forward pass, no graph), so a user error is reported as
    such instead of being taken for a missing forward-mode rule.
    """
    try:
        with torch.no_grad():
            out = fn(*args)
    except Exception:  # fn fails on its own: let the original error speak
        return
    if not isinstance(out, Tensor) or out.dim() != 0:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{owner}: `fn` must return a scalar (0-dim) tensor, got {got}; reduce it, e.g. with .sum() or .mean()."
        ) from err


def _fallback_warning(err: BaseException, *, failed: str = "forward-over-reverse", to: str = "rev_rev") -> None:
    warnings.warn(
        f"{failed} HVP failed ({type(err).__name__}: {str(err)[:200]}); "
        f"hypergrad switched this operator to mode={to!r}. Pass mode={to!r} to "
        f"silence this warning.{attention_hint(err)}",
        HVPFallbackWarning,
        stacklevel=3,
    )


def _is_oom(err: BaseException) -> bool:
    """An allocation failure (CUDA's ``OutOfMemoryError`` or the CPU allocator's RuntimeError)."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _proc_kib(path: str, field: Optional[str]) -> Optional[int]:
    """A KiB count from ``/proc`` (``field`` of ``/proc/meminfo``, or the RSS of ``/proc/self/statm``)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    if field is None:  # statm: size resident ... in pages
        import resource

        return int(text.split()[1]) * resource.getpagesize() // 1024
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def memory_in_use(device: torch.device) -> Optional[int]:
    """Bytes held now on ``device``: the CUDA allocator's allocated bytes, or this process's RSS on a Linux CPU.

    Returns ``None`` where it cannot be read (other devices and systems): no memory guard there.
    """
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        kib = _proc_kib("/proc/self/statm", None)
        return None if kib is None else 1024 * kib
    return None


def memory_available(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device``: CUDA free + cached-but-unused; ``MemAvailable`` on a Linux CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        kib = _proc_kib("/proc/meminfo", "MemAvailable")
        return None if kib is None else 1024 * kib
    return None


class HessianOperator(LinearOperator):
    r"""The Hessian :math:`H = \nabla^2 f(\theta)` of a scalar function, as a matvec.

    .. math:: v \mapsto H v = \nabla^2 f(\theta)\, v

    Immutable: the frozen modes (``"rev_rev_cached"``, ``"fwd_rev_linearized"``) do their one-off
    work here, at construction; ``mode="auto"`` is resolved once, on the first product (to
    ``"rev_rev_cached"``, or to ``"fwd_rev"`` when the cached graph does not fit in memory or
    reverse-over-reverse fails; see the module docstring), and :attr:`mode` never changes
    afterwards. Reusing one operator object for several products or solves at the same point (what
    ``reuse_operator=True`` of the methods does) reuses that work. Tagged ``symmetric=True``;
    ``positive_definite`` is unknown (``None``).

    Args:
        fn: ``fn(params) -> scalar tensor``; close over batches and fixed hyper-parameters. Pure
            (no module state updated: build it with :func:`hypergrad.stateless`), so that tracing
            and graph caching see the same function as every product.
        params: the point :math:`\theta`, a dict of floating-point tensors.
        mode: one of :data:`HVP_MODES` (see the module docstring). ``"rev_rev_cached"`` runs the
            forward and backward pass once here; ``"fwd_rev_linearized"`` traces the linearisation
            of the gradient once here.

    Example:
        >>> import torch
        >>> from hypergrad import HessianOperator
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> H = HessianOperator(f, {"w": torch.tensor([1.0, 2.0])})
        >>> H({"w": torch.tensor([1.0, 1.0])})["w"]  # 6 w * v
        tensor([ 6., 12.])
        >>> H.mode, H.symmetric
        ('rev_rev_cached', True)
    """

    symmetric = True

    def __init__(self, fn: Callable[[TensorTree], Tensor], params: TensorTree, *, mode: HVPMode = "auto"):
        check_callable("fn", fn, "params -> scalar", owner="HessianOperator")
        _check_mode(mode)
        _check_no_inference_mode("HessianOperator")
        _check_params_real(params, owner="HessianOperator")
        self.fn = fn
        self.params = _detach(params)
        self.requested_mode = mode
        self._resolved: Optional[str] = None if mode == "auto" else mode
        self._apply: Optional[Callable[[Any], Any]] = None  # the frozen product of a frozen mode
        self._grad_value: Any = None
        if mode in FROZEN_HVP_MODES:
            try:
                self._freeze(mode)
            except (RuntimeError, NotImplementedError) as err:
                _check_scalar_output(fn, (self.params,), owner="HessianOperator", err=err)
                raise

    def _freeze(self, mode: str) -> None:
        """Build the frozen product of ``mode`` (the cached reverse graph or the traced linearisation)."""
        with second_order():
            if mode == "rev_rev_cached":
                value, self._apply = _reverse_graph(self.fn, self.params)
            else:
                with warnings.catch_warnings():  # torch's tracer warns about its own internals
                    warnings.simplefilter("ignore")
                    try:
                        value, self._apply = linearize(grad(self.fn), self.params)
                        _free_graphs_with(self._apply)
                    except (RuntimeError, NotImplementedError) as err:
                        if "tracing" not in str(err) and "data-dependent" not in str(err):
                            raise
                        raise RuntimeError(
                            "HessianOperator: mode='fwd_rev_linearized' could not trace the gradient with "
                            f"torch.func.linearize ({str(err)[:160]}): `fn` has data-dependent control flow "
                            "(e.g. a padding mask checked in Python). Use mode='rev_rev_cached' (or 'auto'), "
                            "or hypergrad.LinearizedHessian, which falls back to it with a warning."
                        ) from err
        self._grad_value = value

    @property
    def mode(self) -> str:
        """The mode products use: ``requested_mode``, or for ``"auto"`` its resolution (``"auto"`` until the first product).

        Returns:
            One of :data:`HVP_MODES` other than ``"auto"`` (or ``"auto"`` before an ``"auto"``
            operator's first product).
        """
        return self._resolved if self._resolved is not None else "auto"

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        _check_direction("v", v, self.params, owner="HessianOperator")
        if self._resolved is None:  # "auto", first product: resolve once (write-once, never flips back)
            return _detach(self._resolve_auto(v))
        try:
            if self._apply is not None:
                with second_order():
                    return _detach(self._apply(v))
            return _detach(_hvp_once(self.fn, self.params, v, self._resolved))
        except (RuntimeError, NotImplementedError) as err:
            _check_scalar_output(self.fn, (self.params,), owner="HessianOperator", err=err)
            raise

    def matmat(self, V: TreeOrTensor) -> TreeOrTensor:
        r"""Return :math:`H V` for a block of directions, batched where the mode allows.

        * ``"rev_rev_cached"`` (and ``"auto"`` resolved to it): ONE double backward through the
          cached graph with ``torch.autograd.grad(..., is_grads_batched=True)`` (the backward is
          vectorised by ``vmap``); ``"rev_rev"``: one forward and first backward, then the same
          batched double backward;
        * ``"fwd_rev"`` and ``"fwd_rev_linearized"``: ``torch.func.vmap`` of the product over the
          block;
        * ``"finite_diff"``: column by column.

        When the batched product raises (an op without a batching rule that cannot fall back, a
        ``torch.func`` transform refusing plain autograd, running out of memory for the block),
        the operator switches, once and for good, to one :meth:`matvec` per column: the same
        products, so the same result; :attr:`matmat_batched` then reads ``False`` and the reason is
        logged on the ``hypergrad`` logger (INFO). An ``"auto"`` operator is resolved by its
        first column.

        Args:
            V: a dict keyed like ``params`` whose leaves are shaped ``(s, *params[k].shape)``.

        Returns:
            :math:`H V`, detached, shaped like ``V``.

        Raises:
            TypeError / ValueError: ``V`` is not such a block (the message names the leaf).

        Example:
            >>> import torch
            >>> from hypergrad import HessianOperator
            >>> H = HessianOperator(lambda p: (p["w"] ** 3).sum(), {"w": torch.tensor([1.0, 2.0])})
            >>> H.matmat({"w": torch.eye(2)})["w"]  # 6 w on the diagonal
            tensor([[ 6.,  0.],
                    [ 0., 12.]])
            >>> H.matmat_batched
            True
        """
        s = _check_block_direction(V, self.params, owner="HessianOperator.matmat")
        if self._resolved is None:  # "auto": the first column resolves the mode
            first = self.matvec(_column(V, 0))
            if s == 1:
                return _stack_columns([first])
            rest = self.matmat({k: t[1:] for k, t in V.items()})  # type: ignore[union-attr]
            return {k: torch.cat([first[k].unsqueeze(0), rest[k]]) for k in first}  # type: ignore[index]
        if self.matmat_batched is not False and self._resolved != "finite_diff":
            try:
                out = self._batched_products(V)
            except (RuntimeError, NotImplementedError) as err:
                self.matmat_batched = False
                _log.info(
                    "HessianOperator(mode=%r).matmat: the batched product failed (%s: %s); one product per "
                    "column from now on",
                    self._resolved,
                    type(err).__name__,
                    str(err)[:200],
                )
            else:
                if out is not None:
                    self.matmat_batched = True
                    return _detach(out)
        return _loop_matmat(self.matvec, V, owner="HessianOperator.matmat")

    #: ``None`` before the first block product; ``True`` when products are batched, ``False`` after
    #: a fallback to one product per column (read-only; set once).
    matmat_batched: Optional[bool] = None

    def _batched_products(self, V: Any) -> Any:
        """``H V`` in one batched call, or ``None`` when this mode has no batched form."""
        mode = self._resolved
        with second_order():
            if mode == "rev_rev_cached":
                block = getattr(self._apply, "block", None)
                return None if block is None else block(V)
            if mode == "rev_rev":
                block = getattr(_reverse_graph(self.fn, self.params, retain=False)[1], "block", None)
                return None if block is None else block(V)
            if mode == "fwd_rev":
                fn, params = self.fn, self.params
                return torch.func.vmap(lambda v: jvp(grad(fn), (params,), (v,))[1])(V)
            if mode == "fwd_rev_linearized" and self._apply is not None:
                return torch.func.vmap(self._apply)(V)
        return None

    def _resolve_auto(self, v: TreeOrTensor) -> TreeOrTensor:
        """``"auto"``: the cached reverse graph if it fits in memory and works, else ``"fwd_rev"``; returns ``H v``."""
        device = next(iter(self.params.values())).device
        before = memory_in_use(device)
        reason = ""
        try:
            self._freeze("rev_rev_cached")
            graph = None if before is None else max(0, (memory_in_use(device) or 0) - before)
            free = memory_available(device)
            if graph is not None and free is not None and free < graph:
                reason = (
                    f"the cached gradient graph ({graph / 2**20:.0f} MiB) leaves {free / 2**20:.0f} MiB free on "
                    f"{device}, less than its own size"
                )
            else:
                with second_order():
                    out = self._apply(v)  # type: ignore[misc]
                self._resolved = "rev_rev_cached"
                _log.info(
                    "HessianOperator(mode='auto') -> 'rev_rev_cached' (cached graph %s on %s)",
                    "unmeasured" if graph is None else f"{graph / 2**20:.1f} MiB",
                    device,
                )
                return out
        except (RuntimeError, NotImplementedError) as err:
            self._apply, self._grad_value = None, None
            if not _is_oom(err):
                _check_scalar_output(self.fn, (self.params,), owner="HessianOperator", err=err)  # a user error?
                _fallback_warning(err, failed="reverse-over-reverse", to="fwd_rev")
                self._resolved = "fwd_rev"
                return self._fwd_rev_or_raise(v)
            reason = f"building the cached gradient graph ran out of memory ({str(err)[:120]})"
        self._apply, self._grad_value = None, None  # free the graph before the forward-mode product
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _log.info("HessianOperator(mode='auto') -> 'fwd_rev': %s", reason)
        self._resolved = "fwd_rev"
        return self._fwd_rev_or_raise(v)

    def _fwd_rev_or_raise(self, v: TreeOrTensor) -> TreeOrTensor:
        try:
            return _hvp_once(self.fn, self.params, v, "fwd_rev")
        except (RuntimeError, NotImplementedError) as err:
            _check_scalar_output(self.fn, (self.params,), owner="HessianOperator", err=err)
            raise


def _reverse_graph(
    fn: Callable[[TensorTree], Tensor], params: TensorTree, *, retain: bool = True
) -> tuple[dict, Callable[[Any], dict]]:
    r"""``(grad_value, v -> H v)``: the gradient graph of ``fn`` built once by plain autograd, and its double backward.

    ``torch.autograd.grad(fn(theta), theta, create_graph=True)`` once, then one
    ``torch.autograd.grad(g, theta, grad_outputs=v, retain_graph=True)`` per product: what a
    hand-written double backward does. Plain autograd instead of ``torch.func.vjp(grad(fn))``
    for memory: the ``torch.func`` transforms kept 2.8x the tensor memory of the same double
    backward on the BiSSL ResNet (``benchmarks/bench_bissl_step.py --alternation``). A gradient
    entry without a graph (``fn`` linear in that tensor) has a zero Hessian row. The first backward
    is seeded with a ones scalar that requires grad, so a ``@once_differentiable`` backward raises
    on the second pass rather than dropping its second derivative. Inside a
    ``torch.func`` transform (a first product under ``Dense``'s ``vmap``), where plain autograd is
    refused, it is ``torch.func.vjp(grad(fn))``. ``retain=False``
    (one product only, mode ``"rev_rev"``) lets the double backward free the graph as it goes, so
    its peak memory is that of a hand-written double backward; the cached graph (``retain=True``)
    must stay whole while the double backward's gradient buffers for the forward activations fill
    up (none is consumed before the whole first-backward part has run), so it peaks higher by up
    to what the first backward saved: 1.2-1.3x on the BiSSL ResNet (``docs/benchmarks.md``,
    2026-11-28).
    """
    keys = list(params)
    try:
        leaves = [params[k].detach().requires_grad_(True) for k in keys]
    except RuntimeError as err:  # inside a torch.func transform (e.g. Dense's vmap): plain autograd is refused
        if "functorch transform" not in str(err):
            raise
        value, vjp_fn = vjp(grad(fn), params)[:2]
        return value, lambda v: vjp_fn(v)[0]
    with torch.enable_grad():
        loss = fn(dict(zip(keys, leaves)))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise RuntimeError("grad: `fn` must return a scalar tensor")  # reported by _check_scalar_output
        # A seed that requires grad makes every backward node see a differentiable grad_output, so a
        # custom Function whose backward is @once_differentiable raises on the double backward
        # instead of contributing a silent zero Hessian (torch wraps its output in a DelayedError
        # only when a grad_output requires grad). Entries unused or linear still give zeros.
        seed = torch.ones((), dtype=loss.dtype, device=loss.device, requires_grad=True)
        grads: Sequence[Optional[Tensor]] = (None,) * len(leaves)  # `fn` constant in `params`: a zero Hessian
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, leaves, grad_outputs=seed, create_graph=True, allow_unused=True)
    _refuse_once_differentiable(grads)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    value = {k: (g.detach() if g is not None else torch.zeros_like(t)) for k, g, t in zip(keys, grads, leaves)}

    return value, _DoubleBackward(keys, leaves, [cast(Tensor, grads[i]) for i in live], live, retain)


class _DoubleBackward:
    """``v -> H v`` by a double backward through a kept gradient graph; ``block(V)`` for a block of directions.

    A class, not a closure carrying a ``block`` attribute: a closure that refers to itself is a
    reference cycle, and the graph it holds would outlive its operator until Python's cyclic
    garbage collector ran (several per-step graphs alive at once in a BiSSL alternation).
    """

    def __init__(self, keys: list[str], leaves: list[Tensor], grads: list[Tensor], live: list[int], retain: bool):
        self.keys, self.leaves, self.grads, self.live, self.retain = keys, leaves, grads, live, retain

    def __call__(self, v: Any) -> dict:
        return self._products(v, batched=False)

    def block(self, V: Any) -> dict:
        """``H V`` for a block (leaves ``(s, *shape)``) in one batched double backward."""
        return self._products(V, batched=True)

    def _products(self, v: Any, batched: bool) -> dict:
        keys = self.keys
        hv: list[Any] = [None] * len(keys)
        if self.live:
            with torch.enable_grad():
                out = torch.autograd.grad(
                    self.grads,
                    self.leaves,
                    grad_outputs=[v[keys[i]] for i in self.live],
                    retain_graph=self.retain,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            hv = list(out)
        return {k: (h if h is not None else torch.zeros_like(v[k])) for k, h in zip(keys, hv)}


def _free_graphs_with(jvp_fn: Callable[..., Any]) -> None:
    """Free the traced graphs of ``torch.func.linearize``'s ``jvp_fn`` when it dies, without the cyclic collector.

    ``jvp_fn`` calls ``torch.fx`` graph modules holding the linearisation's constants (tensors shaped
    like the forward activations: 12x the parameters of the BiSSL tiny ResNet). A graph module and its
    ``Graph`` refer to each other (``graph.owning_module``), a reference cycle that keeps those tensors
    allocated until Python's cyclic garbage collector runs, so a per-step ``"fwd_rev_linearized"``
    operator would leave several linearisations alive at once. When ``jvp_fn`` is freed, the graphs
    let go of their modules and the constants are freed with them. Nothing is done where the
    closure holds no graph module (another torch version): the result is the same, only freed later.
    """
    cells = getattr(jvp_fn, "__closure__", None) or ()
    graphs = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.nn.Module):
            graphs += [m for m in value.modules() if isinstance(m, torch.fx.GraphModule)]
    if graphs:
        weakref.finalize(jvp_fn, _release_graphs, graphs).atexit = False


def _release_graphs(graphs: list[torch.fx.GraphModule]) -> None:
    for module in graphs:
        module.graph.owning_module = None


def _refuse_once_differentiable(grads: Sequence[Tensor | None]) -> None:
    """Raise if the gradient graph holds a ``@once_differentiable`` backward's error node.

    Such a node hangs off the seed, not off the parameters, so the double backward would skip it
    and return a zero second derivative without a word. One walk of the gradient graph per build.
    """
    seen: set[Any] = set()
    stack: list[Any] = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::Error":
            raise RuntimeError(
                "reverse-over-reverse HVP: `fn` calls a custom torch.autograd.Function whose backward is "
                "@once_differentiable, so its second derivative is not available by double backward (it "
                "would silently be zero). Use mode='fwd_rev' if the Function defines jvp, mode='finite_diff' "
                "(the route for sharded operators), or make its backward differentiable."
            )
        stack.extend(n for n, _ in node.next_functions)


def _hvp_once(fn: Callable[[TensorTree], Tensor], params: TensorTree, v: TreeOrTensor, mode: str) -> TreeOrTensor:
    if mode in ("fwd_rev", "fwd_rev_linearized"):
        with second_order():
            return jvp(grad(fn), (params,), (v,))[1]
    if mode in ("rev_rev", "rev_rev_cached"):
        with second_order():
            return _reverse_graph(fn, params, retain=False)[1](v)
    return _central_difference(grad(fn), params, v)


def _central_difference(g: Callable[[Any], Any], params: TensorTree, v: TreeOrTensor) -> Any:
    r"""``(g(theta + eps u) - g(theta - eps u)) * |v|_max / (2 eps)``, ``u = v / |v|_max``: first-order passes only.

    By linearity, :math:`Jv = |v|_{\max} J (v / |v|_{\max})`: differencing along the rescaled
    direction keeps the step well defined when :math:`\|v\|^2` under- or overflows (a converged
    solver's tiny residuals). The step is :math:`\epsilon_{\text{mach}}^{1/3} (1 + \|\theta\|) / \|u\|`.
    """
    leaves = [v] if isinstance(v, Tensor) else list(v.values())
    v_max = float(torch.stack([t.detach().abs().max() for t in leaves]).max())
    if v_max == 0.0:
        like = g(params)
        return tree_map(torch.zeros_like, like)
    u = tree_scale(v, 1.0 / v_max)
    eps_mach = torch.finfo(next(iter(params.values())).dtype).eps
    eps = (eps_mach ** (1.0 / 3.0)) * (1.0 + float(tree_norm(params))) / float(tree_norm(u))
    g_plus = g(tree_axpy(eps, u, params))
    g_minus = g(tree_axpy(-eps, u, params))
    return tree_scale(tree_sub(g_plus, g_minus), v_max / (2.0 * eps))


def hvp(
    fn: Callable[[TensorTree], Tensor], params: TensorTree, v: TreeOrTensor, *, mode: HVPMode = "auto"
) -> TreeOrTensor:
    r"""One Hessian-vector product :math:`\nabla^2 f(\theta) v`.

    For repeated products at the same point, build a :class:`HessianOperator` instead.

    Args:
        fn: ``fn(params) -> scalar tensor``.
        params: the point :math:`\theta`, a dict of floating-point tensors.
        v: the direction, a tree keyed and shaped like ``params`` (same dtype and device).
        mode: one of :data:`HVP_MODES` (see the module docstring); the default ``"auto"`` is the
            default of every hypergrad function.

    Returns:
        :math:`\nabla^2 f(\theta) v`, a detached tree keyed like ``params``.

    Raises:
        ValueError: ``v`` has other keys, shapes, dtypes or devices than ``params``, or a tensor
            is a meta tensor.
        RuntimeError: called under ``torch.inference_mode()``.

    Example:
        >>> import torch
        >>> from hypergrad import hvp
        >>> f = lambda p: (p["w"] ** 2).sum() * p["b"].sum()
        >>> p = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
        >>> hvp(f, p, {"w": torch.zeros(2), "b": torch.ones(1)})["w"]  # d2f/dw db = 2w
        tensor([2., 4.])
    """
    _check_mode(mode)
    _check_no_inference_mode("hvp")
    _check_params_real(params, owner="hvp")
    _check_direction("v", v, params, owner="hvp")
    return HessianOperator(fn, params, mode=mode)(v)


def mixed_hvp(
    fn: Callable[[TensorTree, TensorTree], Tensor],
    params: TensorTree,
    hparams: TensorTree,
    v: TreeOrTensor,
    *,
    mode: HVPMode = "auto",
) -> TensorTree:
    r"""The mixed second-derivative product :math:`\big(\partial^2_{\lambda\theta} G\big) v`.

    .. math:: \big(\partial^2_{\lambda\theta} G\big) v = \nabla_\lambda \langle \nabla_\theta G(\theta, \lambda), v \rangle

    computed reverse-over-reverse as the VJP (in :math:`\lambda`) of :math:`\nabla_\theta G` (the
    ``"rev_rev"`` modes and ``"auto"``: one product, so nothing to cache, and the faster single
    product measured), forward-over-reverse as the JVP (in :math:`\theta`, along :math:`v`) of
    :math:`\nabla_\lambda G` (the ``"fwd_rev"`` modes: the least memory), or by central
    differences of :math:`\nabla_\lambda G` along :math:`v` (``"finite_diff"``: first-order passes
    only). ``"auto"`` falls back from reverse to forward mode with an :class:`HVPFallbackWarning`
    if reverse mode raises (quietly, logged, if it runs out of memory).

    Args:
        fn: :math:`G`, ``fn(params, hparams) -> scalar tensor``.
        params: :math:`\theta`, a dict of tensors.
        hparams: :math:`\lambda`, a dict of tensors.
        v: a tree keyed and shaped like ``params``.
        mode: one of :data:`HVP_MODES`.

    Returns:
        A detached dict keyed like ``hparams``.

    Raises:
        ValueError: ``v`` has other keys, shapes, dtypes or devices than ``params``, or a tensor
            is a meta tensor.
        RuntimeError: called under ``torch.inference_mode()``.

    Example:
        >>> import torch
        >>> from hypergrad import mixed_hvp
        >>> G = lambda p, h: (h["lam"] * p["w"] ** 2).sum()
        >>> mixed_hvp(G, {"w": torch.tensor([1.0, 2.0])}, {"lam": torch.tensor(0.5)}, {"w": torch.ones(2)})["lam"]
        tensor(6.)
    """
    _check_mode(mode)
    _check_no_inference_mode("mixed_hvp")
    _check_params_real(params, owner="mixed_hvp")
    _check_params_real(hparams, owner="mixed_hvp", name="hparams")
    _check_direction("v", v, params, owner="mixed_hvp")
    params, hparams = _detach(params), _detach(hparams)
    if mode == "finite_diff":
        return _detach(_central_difference(lambda th: grad(fn, argnums=1)(th, hparams), params, v))
    if mode in ("auto", "rev_rev", "rev_rev_cached"):
        try:
            with second_order():
                out = vjp(lambda lam: grad(fn, argnums=0)(params, lam), hparams)[1](v)[0]
            return _detach(out)
        except (RuntimeError, NotImplementedError) as err:
            _check_scalar_output(fn, (params, hparams), owner="mixed_hvp", err=err)  # a user error is not a fallback
            if mode != "auto":
                raise
            if _is_oom(err):
                _log.info("mixed_hvp(mode='auto') -> 'fwd_rev': reverse-over-reverse ran out of memory")
            else:
                _fallback_warning(err, failed="reverse-over-reverse", to="fwd_rev")
    try:
        with second_order():
            out = jvp(lambda th: grad(fn, argnums=1)(th, hparams), (params,), (v,))[1]
    except (RuntimeError, NotImplementedError) as err:
        _check_scalar_output(fn, (params, hparams), owner="mixed_hvp", err=err)
        raise
    return _detach(out)


class Damped(LinearOperator):
    r"""Tikhonov damping (and scaling): :math:`v \mapsto (s A + \mu I) v`.

    Wraps any operator; solvers stay unaware of damping. Use it to regularise an indefinite or
    ill-conditioned Hessian (``mu > 0``) before :class:`~hypergrad.solvers.CG`. With ``scale``
    :math:`s` it also writes the proximal operator :math:`I + H/\lambda` (``scale=1/lam, mu=1``).
    Tags: symmetric when :math:`A` is; positive definite when :math:`A` is tagged so, unknown
    otherwise.

    Args:
        operator: any callable ``v -> A v`` (a :class:`HessianOperator`, a lambda).
        mu: the damping :math:`\mu \ge 0`.
        scale: :math:`s > 0` multiplying :math:`A` (default 1).

    Example:
        >>> import torch
        >>> from hypergrad import Damped
        >>> Damped(lambda v: 2 * v, 0.5)(torch.ones(2))
        tensor([2.5000, 2.5000])
    """

    def __init__(self, operator: Callable[[TreeOrTensor], TreeOrTensor], mu: float, *, scale: float = 1.0):
        check_callable("operator", operator, "v -> A v", owner="Damped")
        self.operator = operator
        self.mu = check_positive("mu", mu, allow_zero=True, owner="Damped")
        self.scale = check_positive("scale", scale, owner="Damped")
        sym, pd = operator_tags(operator)
        self.symmetric = sym
        self.positive_definite = True if pd else None

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        av = self.operator(v)
        if self.scale != 1.0:
            av = tree_scale(av, self.scale)
        return tree_axpy(self.mu, v, av) if self.mu != 0.0 else av

    def matmat(self, V: TreeOrTensor) -> TreeOrTensor:
        """:math:`(sA + \\mu I) V` with the wrapped operator's own ``matmat`` (batched if it is).

        Args:
            V: a block (leaves with a leading block dimension).

        Returns:
            The block of products, shaped like ``V``.
        """
        av = _block_product(self.operator, V)
        if self.scale != 1.0:
            av = tree_scale(av, self.scale)
        return tree_axpy(self.mu, V, av) if self.mu != 0.0 else av


class Mapped(LinearOperator):
    r"""An operator followed by a linear map of its output, keeping the tags: :math:`v \mapsto R(A v)`.

    ``post`` must be linear and must not change the operator's symmetry, e.g. an average over
    data-parallel ranks (:func:`hypergrad.distributed.all_reduce_mean`), which is how the methods
    of :class:`~hypergrad.BilevelProblem` use it.

    Args:
        operator: any callable ``v -> A v``.
        post: a linear map on trees, ``tree -> tree``.

    Example:
        >>> import torch
        >>> from hypergrad.operators import Damped, Mapped
        >>> op = Mapped(Damped(lambda v: v, 1.0), lambda t: t)
        >>> op(torch.ones(1)), op.symmetric
        (tensor([2.]), None)
    """

    def __init__(self, operator: Callable[[TreeOrTensor], TreeOrTensor], post: Callable[[Any], Any]):
        check_callable("operator", operator, "v -> A v", owner="Mapped")
        check_callable("post", post, "tree -> tree", owner="Mapped")
        self.operator, self.post = operator, post
        self.symmetric, self.positive_definite = operator_tags(operator)

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        return self.post(self.operator(v))

    def matmat(self, V: TreeOrTensor) -> TreeOrTensor:
        """:math:`R(A V)`: the wrapped operator's ``matmat``, then ``post`` column by column (it is linear on trees).

        Args:
            V: a block (leaves with a leading block dimension).

        Returns:
            The block of products, shaped like ``V``.
        """
        return _loop_matmat(self.post, _block_product(self.operator, V))


class FixedPointOperator(LinearOperator):
    r"""The adjoint operator of a fixed-point map: :math:`v \mapsto (I - \partial_\theta\Phi^\top) v`.

    For :math:`\theta^* = \Phi(\theta^*, \lambda)` the hypergradient needs
    :math:`v = \partial_\theta\Phi^\top v + \nabla_\theta F`, i.e. :math:`(I - \partial_\theta\Phi^\top) v
    = \nabla_\theta F`, and then :math:`\partial_\lambda\Phi^\top v` (:meth:`hparam_vjp`). The map
    is run forward once, at construction (under the twice-differentiable attention backend); every
    matvec is one VJP through that graph. Tagged ``symmetric=False`` (so CG refuses it) unless
    ``symmetric=True`` is passed (true when :math:`\Phi` is a gradient step
    :math:`\theta - \eta\nabla_\theta G`).

    Args:
        phi: ``phi(params, hparams) -> params`` (same keys and shapes as ``params``).
        params: the fixed point :math:`\theta^*` (approximately).
        hparams: :math:`\lambda`.
        symmetric: declare :math:`\partial_\theta\Phi` symmetric.

    Example:
        >>> import torch
        >>> from hypergrad import FixedPointOperator
        >>> phi = lambda p, h: {"w": 0.5 * p["w"] + h["b"]}
        >>> op = FixedPointOperator(phi, {"w": torch.ones(2)}, {"b": torch.zeros(2)})
        >>> op({"w": torch.ones(2)})["w"], op.symmetric
        (tensor([0.5000, 0.5000]), False)
    """

    def __init__(self, phi: FixedPointMap, params: TensorTree, hparams: TensorTree, *, symmetric: bool = False):
        check_callable("phi", phi, "(params, hparams) -> params", owner="FixedPointOperator")
        _check_no_inference_mode("FixedPointOperator")
        if not isinstance(symmetric, bool):
            raise TypeError(f"FixedPointOperator: `symmetric` must be True or False, got {symmetric!r}.")
        _check_params_real(params, owner="FixedPointOperator")
        _check_params_real(hparams, owner="FixedPointOperator", name="hparams")
        self.symmetric = symmetric
        self.params, self.hparams = _detach(params), _detach(hparams)
        with second_order():
            out, self._vjp_fn = vjp(phi, self.params, self.hparams)[:2]
        if not isinstance(out, dict):
            raise TypeError(f"`phi` must return a dict of tensors keyed like `params`, got {type(out).__name__}.")
        tree_check_like("phi(params, hparams)", out, self.params, "params")
        self.phi_value = _detach(out)

    def matvec(self, v: TreeOrTensor) -> TreeOrTensor:
        _check_direction("v", v, self.params, owner="FixedPointOperator")
        with second_order():
            return tree_sub(v, _detach(self._vjp_fn(v)[0]))

    def hparam_vjp(self, v: TensorTree) -> TensorTree:
        r"""The hyper-parameter VJP :math:`\partial_\lambda\Phi(\theta, \lambda)^\top v` through the stored graph.

        Args:
            v: a tree keyed and shaped like ``params`` (the solution of the adjoint system).

        Returns:
            A detached dict keyed like ``hparams``.
        """
        _check_direction("v", v, self.params, owner="FixedPointOperator.hparam_vjp")
        with second_order():
            return _detach(self._vjp_fn(v)[1])
