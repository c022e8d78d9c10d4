"""GPU checks: hypergrad on a CUDA device against float64 references computed on the CPU.

Dry run on the CPU: ``HYPERGRAD_CUDA_TESTS_DEVICE=cpu python -m pytest -q tests/test_cuda.py`` (gloo instead of
NCCL, the ``"eager"`` compile backend; SyncBatchNorm and CUDA-graph capture need CUDA and are skipped there).

Every reference is computed without the code under test where it can be: dense Hessians by batched double
backward on the CPU in float64 (MATH attention backend), ``torch.linalg.solve`` through ``hypergrad.Dense`` on
the CPU, or the same bilevel computation on the CPU in float64. float64 on the GPU agrees with the CPU to
about 1e-10 (the order of floating-point sums differs), not bitwise; float32 products through fused attention
kernels agree to about 1e-5 with TF32 switched off.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergrad
from hypergrad import CG, CompiledCG, CompileFallbackWarning, HessianOperator, hvp, tree_ravel
from hypergrad.solvers import compiled_cg
from tests.fsdp_models import mlp
from tests.helpers_problem import attention_dense_hessian, state_leaves

#: the device under test; "cpu" dry-runs the whole file without a GPU
DEV = os.environ.get("HYPERGRAD_CUDA_TESTS_DEVICE", "cuda")
ON_CUDA = DEV.startswith("cuda")
DEVICE_TYPE = torch.device(DEV).type
F64, F32 = torch.float64, torch.float32
EXACT_MODES = ["fwd_rev", "rev_rev", "rev_rev_cached", "auto"]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs CUDA (dry run: see the docstring)"),
]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device (not part of the CPU dry run)")


# ---------------------------------------------------------------- comparison helpers


def rel(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over trees (``a`` moved to ``b``'s device and dtype)."""
    num = sum(float(((a[k].to(b[k]) - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def assert_states_close(got: dict, ref: dict, rtol: float) -> None:
    """Two ``state_dict()``s: the same structure, every float tensor within ``rtol`` of its norm.

    A tensor whose reference is itself at rounding level (a momentum buffer of 2e-16 where the
    parameters are of order 1) is compared with ``rtol`` times a floor of 1e-3 (float64 rounding of
    order-1 quantities), not with its own norm."""
    a, b = state_leaves(got), state_leaves(ref)
    assert a.keys() == b.keys()
    for k in b:
        if isinstance(b[k], Tensor) and b[k].is_floating_point():
            x, y = a[k].detach().cpu().to(F64), b[k].detach().cpu().to(F64)
            assert x.shape == y.shape, k
            err = float((x - y).norm())
            assert err <= rtol * max(float(y.norm()), 1e-3), f"{k}: |diff| {err:.3e}, |ref| {float(y.norm()):.3e}"
        elif isinstance(b[k], Tensor):
            assert torch.equal(a[k].cpu(), b[k].cpu()), k
        else:
            assert a[k] == b[k], k


def assert_states_equal(got: dict, ref: dict, same_device: bool = True) -> None:
    """Bitwise equality of two ``state_dict()``s (and of each tensor's device, with ``same_device``)."""
    a, b = state_leaves(got), state_leaves(ref)
    assert a.keys() == b.keys()
    for k in b:
        if isinstance(b[k], Tensor):
            assert not same_device or a[k].device == b[k].device, k
            assert torch.equal(a[k].cpu(), b[k].cpu()), k
        else:
            assert a[k] == b[k], k


def _on(batch: Any, device: Any, dtype: torch.dtype | None = None) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(_on(t, device, dtype) for t in batch)
    if batch.is_floating_point() and dtype is not None:
        return batch.to(device=device, dtype=dtype)
    return batch.to(device)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (TF32 would cost ~3 digits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------- 1. a conv net with BatchNorm, CUDA vs CPU
def conv_bn_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    ).to(F64)
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


class WeightDecay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_wd = nn.Parameter(torch.tensor([-2.0, -1.0], dtype=F64))  # conv / linear weight decay


def _G(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    wd = outer.log_wd.exp()
    weights = [m.weight for m in inner if isinstance(m, (nn.Conv2d, nn.Linear))]  # first and last layer decayed
    reg = wd[0] * (weights[0] ** 2).sum() + wd[1] * (weights[-1] ** 2).sum()
    return ((inner(x) - y) ** 2).mean() + 0.5 * reg


def _F(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.smooth_l1_loss(inner(x), y)


def conv_batches(seed: int) -> tuple[list, Any]:
    g = torch.Generator().manual_seed(seed)
    mk = lambda: (torch.randn(8, 2, 4, 4, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64))
    return [mk(), mk()], mk()


def conv_problem(
    device: str, net: Callable[[], nn.Module] = conv_bn_net, damping: float = 5.0, **kw: Any
) -> tuple[hypergrad.BilevelProblem, nn.Module, nn.Module]:
    inner, outer = net().to(device), WeightDecay().to(device)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.05, momentum=0.9)),
        hypergrad.Level(outer, torch.optim.Adam(outer.parameters(), lr=0.05)),
        _G,
        _F,
        hypergrad.Implicit(solver=CG(max_steps=6), damping=damping, warm_start=True),
        **kw,
    )
    return problem, inner, outer


def run_steps(problem: hypergrad.BilevelProblem, device: str, seeds: tuple[int, ...] = (0, 1)) -> list:
    records = []
    for seed in seeds:
        inner_batches, outer_batch = conv_batches(seed)
        record = problem.step([_on(b, device) for b in inner_batches], _on(outer_batch, device))
        assert not record.skipped and not record.solve_failed, (record.reason, record.solve)
        records.append(record)
    return records


def test_problem_step_with_batchnorm_on_cuda_equals_the_cpu_in_float64() -> None:
    ref_problem, ref_inner, _ = conv_problem("cpu")
    start = {k: v.clone() for k, v in ref_inner.state_dict().items()}
    ref_records = run_steps(ref_problem, "cpu")
    problem, inner, _ = conv_problem(DEV)
    assert next(inner.parameters()).device.type == DEVICE_TYPE
    records = run_steps(problem, DEV)
    # parameters, buffers (BN running statistics), optimiser states (momentum, Adam moments), warm start, counters
    assert_states_close(problem.state_dict(), ref_problem.state_dict(), rtol=1e-10)
    assert problem.method_state.x0 is not None and next(iter(problem.method_state.x0.values())).device.type == (
        DEVICE_TYPE
    )
    for got, ref in zip(records, ref_records):
        assert got.inner_losses == pytest.approx(ref.inner_losses, rel=1e-10)
        assert got.hypergrad_norm == pytest.approx(ref.hypergrad_norm, rel=1e-10)
        assert float(got.outer_loss) == pytest.approx(float(ref.outer_loss), rel=1e-10)
    # the steps really moved the running statistics and the parameters (so the comparison could fail)
    assert int(inner[1].num_batches_tracked) == 4
    assert float((inner[1].running_mean.cpu() - start["1.running_mean"]).norm()) > 1e-3
    assert float((inner[0].weight.detach().cpu() - start["0.weight"]).norm()) > 1e-4


# ---------------------------------------------------------------- 2. second order through fused attention, float32
class CausalAttention(nn.Module):
    """One causal self-attention layer on ``F.scaled_dot_product_attention`` (two heads of width 8)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


def _attention_model(kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "sdpa":
        return CausalAttention()
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=16, dropout=0.0, batch_first=True)


def _attention_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(8)
    return torch.randn(3, 6, 16, generator=g), torch.randn(3, 6, 16, generator=g)


@pytest.fixture(scope="module")
def attention_hessians() -> dict[str, Tensor]:
    """Dense float64 CPU Hessians of both attention models' losses, at the float32 weights and data."""
    out = {}
    x, y = (t.to(F64) for t in _attention_data())
    for kind in ("sdpa", "encoder"):
        model = _attention_model(kind).to(F64)
        f = hypergrad.stateless(model)
        h = attention_dense_hessian(lambda p: ((f(p, x) - y) ** 2).mean(), hypergrad.module_params(model))
        assert torch.allclose(h, h.T, atol=1e-10)  # the reference itself is a Hessian
        out[kind] = h
    return out


def test_plain_double_backward_through_the_fused_attention_kernel_fails() -> None:
    """The premise of the next test: float32 attention on this device has a fused kernel (memory-efficient on
    CUDA, flash on the CPU) that supports first-order backward but not double backward."""
    fused = SDPBackend.EFFICIENT_ATTENTION if ON_CUDA else SDPBackend.FLASH_ATTENTION
    model = _attention_model("sdpa").to(DEV)
    x, y = (t.to(DEV) for t in _attention_data())
    p = list(model.parameters())
    with sdpa_kernel(fused):
        g = torch.autograd.grad(((model(x) - y) ** 2).mean(), p, create_graph=True)  # first order works
        assert all(torch.isfinite(t).all() for t in g)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(sum((t**2).sum() for t in g), p)


@pytest.mark.parametrize("kind", ["sdpa", "encoder"])
@pytest.mark.parametrize("mode", EXACT_MODES)
def test_float32_hvp_through_attention_equals_the_float64attention_dense_hessian(
    kind: str, mode: str, attention_hessians: dict, no_tf32: None
) -> None:
    model = _attention_model(kind).to(DEV)
    x, y = (t.to(DEV) for t in _attention_data())
    f = hypergrad.stateless(model)
    params = hypergrad.module_params(model)
    assert all(v.dtype == F32 and v.device.type == DEVICE_TYPE for v in params.values())

    def loss(p: dict) -> Tensor:
        return ((f(p, x) - y) ** 2).mean()

    g = torch.Generator().manual_seed(9)
    v = {k: torch.randn(t.shape, generator=g).to(DEV) for k, t in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", hypergrad.HVPFallbackWarning)  # exact, no silent finite differences
        op = HessianOperator(loss, params, mode=mode)
        products = [tree_ravel(op(v))[0], tree_ravel(op(v))[0], tree_ravel(hvp(loss, params, v, mode=mode))[0]]
    expected = attention_hessians[kind] @ tree_ravel(v)[0].cpu().to(F64)
    for out in products:
        assert out.dtype == F32 and out.device.type == DEVICE_TYPE
        err = float((out.cpu().to(F64) - expected).norm()) / float(expected.norm())
        assert err <= 1e-4, f"{kind}/{mode}: relative error {err:.2e}"


def test_bf16_autocast_hypergradient_through_attention_is_close_to_float64(no_tf32: None) -> None:
    """Implicit hypergradient under ``torch.autocast(bfloat16)`` (bf16 fused attention in the first-order
    passes, MATH in the second-order ones) against the same problem in float64 on the CPU."""

    def G(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        reg = outer["wd"][0] * (inner.qkv.weight**2).sum() + outer["wd"][1] * (inner.out.weight**2).sum()
        return ((inner(x).float() - y) ** 2).mean() + reg

    def F(inner: nn.Module, outer: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return ((inner(x).float() - y) ** 2).mean()

    gen = torch.Generator().manual_seed(10)
    train = (torch.randn(4, 8, 16, generator=gen), torch.randn(4, 8, 16, generator=gen))
    val = (torch.randn(4, 8, 16, generator=gen), torch.randn(4, 8, 16, generator=gen))
    grads = {}
    for device, dtype, amp in (("cpu", F64, False), (DEV, F32, True)):
        inner = _attention_model("sdpa").to(device=device, dtype=dtype)
        outer = nn.ParameterDict({"wd": nn.Parameter(torch.tensor([0.01, 0.02], dtype=dtype, device=device))})
        problem = hypergrad.BilevelProblem(
            hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1)),
            hypergrad.Level(outer, torch.optim.SGD(outer.parameters(), lr=0.1)),
            G,
            F,
            hypergrad.Implicit(solver=CG(max_steps=10), damping=3.0),
        )
        seen: list[torch.dtype] = []
        handle = inner.out.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16, enabled=amp):
            record = problem.hypergradient(_on(val, device, dtype), hessian_batch=_on(train, device, dtype))
        handle.remove()
        assert set(seen) == {torch.bfloat16 if amp else F64}  # autocast reached the functional passes
        assert not record.skipped and record.solve is not None and not record.solve_failed, record.solve
        grad = outer["wd"].grad
        assert grad.dtype == dtype and bool(torch.isfinite(grad).all())
        grads[amp] = grad.detach().cpu().to(F64)
    err = float((grads[True] - grads[False]).norm() / grads[False].norm())
    assert err <= 5e-2, f"bf16 hypergradient relative error {err:.2e}"


# ---------------------------------------------------------------- 4. CompiledCG equals CG
#: inductor kernels on CUDA; tracing only in the CPU dry run (a C++ build would take minutes)
COMPILE_BACKEND = "inductor" if ON_CUDA else "eager"


def _tiny_mlp_operator() -> tuple[HessianOperator, dict]:
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(device=DEV, dtype=F64)
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(10, 4, generator=g, dtype=F64).to(DEV), torch.randn(10, 2, generator=g, dtype=F64).to(DEV)
    f = hypergrad.stateless(net)
    params = hypergrad.module_params(net)

    def loss(p: dict) -> Tensor:
        return ((f(p, x) - y) ** 2).mean() + 0.5 * sum((t**2).sum() for t in p.values())

    b = {k: torch.randn(t.shape, generator=g, dtype=F64).to(DEV) for k, t in params.items()}
    return HessianOperator(loss, params, mode="fwd_rev"), b


def _dense_tree_operator() -> tuple[Callable, dict]:
    """An SPD 12 x 12 matrix acting on a two-leaf tree (no autograd inside the compiled loop)."""
    g = torch.Generator().manual_seed(16)
    m = torch.randn(12, 12, generator=g, dtype=F64)
    a = (m @ m.T / 12 + torch.eye(12, dtype=F64)).to(DEV)
    split = lambda t: {"u": t[:4], "w": t[4:].reshape(2, 4)}
    matvec = lambda v: split(a @ torch.cat([v["u"], v["w"].reshape(-1)]))
    return matvec, split(torch.randn(12, generator=g, dtype=F64).to(DEV))


@pytest.mark.parametrize("operator", ["dense_tree", "hessian_fwd_rev"])
def test_compiled_cg_equals_cg_with_the_same_budget(operator: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No fallback allowed: on CUDA the loop must compile (inductor, triton kernels)."""
    monkeypatch.setattr(compiled_cg, "_FAILED", {})  # no remembered failure from another test
    torch._dynamo.reset()
    op, b = _dense_tree_operator() if operator == "dense_tree" else _tiny_mlp_operator()
    eager = CG(max_steps=5)(op, b)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)  # a fallback to the eager loop is a failure here
            compiled = CompiledCG(max_steps=5, backend=COMPILE_BACKEND)(op, b)
            again = CompiledCG(max_steps=5, backend=COMPILE_BACKEND)(op, {k: 2 * v for k, v in b.items()})
    finally:
        torch._dynamo.reset()
    assert compiled.stats["compiled"] is True and again.stats["compiled"] is True
    assert eager.status is compiled.status is hypergrad.Status.FIXED_BUDGET  # positive definite: no curvature exit
    assert (compiled.num_steps, compiled.num_matvecs) == (eager.num_steps, eager.num_matvecs) == (5, 5)
    assert all(t.device.type == DEVICE_TYPE for t in compiled.x.values())
    assert rel(compiled.x, eager.x) <= 1e-10
    assert rel(again.x, {k: 2 * v for k, v in eager.x.items()}) <= 1e-10  # linear in b: the cache serves it
    assert compiled.residual_norm == pytest.approx(eager.residual_norm, rel=1e-6)
    # five steps are a partial solve of these 12 / 44-unknown systems (the comparison is not of exact solves)
    assert eager.residual_norm > 1e-8 * float(tree_ravel(b)[0].norm())


# ---------------------------------------------------------------- 5. checkpoint of a CUDA problem via the CPU
def test_checkpoint_through_the_cpu_resumes_bitwise_on_the_device(tmp_path: Path) -> None:
    """Save after one step, load onto the CPU, load into a fresh device problem: its next step equals the
    uninterrupted run's bitwise. An MLP with BatchNorm (no convolution: cuDNN may pick non-deterministic
    convolution algorithms)."""

    def net() -> nn.Module:
        torch.manual_seed(14)
        return nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).to(F64)

    def problem_on() -> tuple[hypergrad.BilevelProblem, nn.Module, nn.Module]:
        problem, inner, outer = conv_problem(DEV, net=net, damping=20.0)
        return problem, inner, outer

    ref, _, _ = problem_on()
    run_steps(ref, DEV, seeds=(0,))
    path = hypergrad.save_checkpoint(ref.state_dict(), tmp_path / "problem.pt", kind="cuda-test")
    run_steps(ref, DEV, seeds=(1,))
    loaded = hypergrad.load_checkpoint(path, map_location="cpu", expected_kind="cuda-test")
    assert all(t.device.type == "cpu" for t in state_leaves(loaded).values() if isinstance(t, Tensor))
    resumed, _, _ = problem_on()
    run_steps(resumed, DEV, seeds=(5,))  # move it away first: the load must overwrite everything
    resumed.load_state_dict(loaded)
    # the live state is back on the device (state_dict() itself keeps the warm start on the CPU by design)
    live = {
        "inner": resumed.inner.module.state_dict(),
        "outer": resumed.outer.module.state_dict(),
        "inner_opt": resumed.inner.optimizer.state_dict()["state"],
        "outer_opt": resumed.outer.optimizer.state_dict()["state"],
        "x0": resumed.method_state.x0 or {},
    }
    off = [k for k, t in state_leaves(live).items() if _is_float(t) and t.device.type != DEVICE_TYPE]
    assert not off, f"left off the device after load_state_dict: {off}"
    run_steps(resumed, DEV, seeds=(1,))
    assert_states_equal(resumed.state_dict(), ref.state_dict())
    # and back: the device state saved again and loaded straight onto the device is the same state
    again = hypergrad.load_checkpoint(
        hypergrad.save_checkpoint(resumed.state_dict(), tmp_path / "again.pt"), map_location=DEV
    )
    assert all(t.device.type == DEVICE_TYPE for t in state_leaves(again).values() if isinstance(t, Tensor))
    assert_states_equal(again, ref.state_dict(), same_device=False)


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0


# ---------------------------------------------------------------- 6. a CUDA-graph capture of the fixed-budget CG loop
@needs_cuda
def test_cuda_graph_replay_of_the_fixed_budget_cg_loop_equals_eager() -> None:
    """``CompiledCG``'s loop has no host synchronisation, so it can be captured into a ``torch.cuda.CUDAGraph``
    as is; replays on new right-hand sides (copied into the static input) equal the eager loop."""
    g = torch.Generator().manual_seed(15)
    m = torch.randn(12, 12, generator=g, dtype=F64)
    a = (m @ m.T / 12 + torch.eye(12, dtype=F64)).to(DEV)
    split = lambda t: {"u": t[:4], "w": t[4:].reshape(2, 4)}  # a tree of two leaves of different shapes
    tree_matvec = lambda v: split(a @ torch.cat([v["u"], v["w"].reshape(-1)]))
    rhs = [split(torch.randn(12, generator=g, dtype=F64).to(DEV)) for _ in range(3)]
    static_b = {k: v.clone() for k, v in rhs[0].items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(2):
            compiled_cg._cg_steps(tree_matvec, static_b, None, 6)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_x, static_rr, _ = compiled_cg._cg_steps(tree_matvec, static_b, None, 6)
    for b in rhs:
        for k in b:
            static_b[k].copy_(b[k])
        graph.replay()
        torch.cuda.synchronize()
        x, rr, _ = compiled_cg._cg_steps(tree_matvec, b, None, 6)
        assert rel(static_x, x) <= 1e-12 and float(static_rr) == pytest.approx(float(rr), rel=1e-8, abs=1e-28)
        # 6 < 12 steps: a partial solve; with 12 steps it would be the exact one, so check the residual is honest
        res = torch.cat([b["u"], b["w"].reshape(-1)]) - a @ torch.cat([static_x["u"], static_x["w"].reshape(-1)])
        assert float(res.norm() ** 2) == pytest.approx(float(static_rr), rel=1e-6)


# ---------------------------------------------------------------- 3. a one-rank NCCL (gloo on the CPU) process group
# (last in the file: the module-scoped group lives from its first test to the end of the module, so no test
# above - the CUDA-graph capture in particular - runs beside the NCCL watchdog thread)
@pytest.fixture(scope="module")
def process_group() -> Iterator[str]:
    """A world-size-1 process group on this device's backend, destroyed after the module."""
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this process; the one-rank group cannot be created")
    backend = "nccl" if ON_CUDA else "gloo"
    kw: dict[str, Any] = {}
    if ON_CUDA and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kw["device_id"] = torch.device(DEV if ":" in DEV else "cuda:0")
    try:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    except (RuntimeError, ValueError, TypeError):
        if not kw:
            raise
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)  # lazy NCCL init instead
    try:
        yield backend
    finally:
        dist.destroy_process_group()


class CollectiveMean(hypergrad.AbstractReduction):
    """``DataParallelMean`` without its one-rank shortcut: every tree really goes through ``all_reduce``."""

    def __init__(self) -> None:
        self.calls = {"reduce": 0, "broadcast": 0}

    def reduce(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        self.calls["reduce"] += 1
        out = {}
        for k, v in tree.items():
            t = v.detach().clone().contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            out[k] = t / dist.get_world_size()
        return out

    def broadcast(self, modules: Any) -> None:
        self.calls["broadcast"] += 1
        with torch.no_grad():
            for m in modules:
                for t in [*m.parameters(), *m.buffers()]:
                    dist.broadcast(t.data, 0)


def test_collective_reduction_step_equals_the_local_step(process_group: str) -> None:
    assert dist.get_backend() == process_group
    local, _, _ = conv_problem(DEV, distributed=False)
    run_steps(local, DEV)
    reduction = CollectiveMean()
    reduced, _, _ = conv_problem(DEV, reduction=reduction)
    run_steps(reduced, DEV)
    # inner gradients, outer gradients and every HVP of the solve went through the collective
    assert reduction.calls["broadcast"] == 1 and reduction.calls["reduce"] > 2 * 6
    assert_states_close(reduced.state_dict(), local.state_dict(), rtol=1e-12)
    # the library's own strategy under the group (one rank: its shortcut) and the default choice agree too
    default, _, _ = conv_problem(DEV)
    assert isinstance(default.reduction, hypergrad.LocalReduction)  # one rank: nothing to average
    explicit, _, _ = conv_problem(DEV, reduction=hypergrad.DataParallelMean())
    for problem in (default, explicit):
        run_steps(problem, DEV)
        assert_states_close(problem.state_dict(), local.state_dict(), rtol=1e-12)
    assert hypergrad.distributed.world_size() == 1
    tree = {"a": torch.ones(3, device=DEV, dtype=F64)}
    assert hypergrad.distributed.all_reduce_mean(tree) is tree


@needs_cuda
def test_sync_batchnorm_step_equals_the_batchnorm_step(process_group: str) -> None:
    """With one rank SyncBatchNorm computes with the local batch statistics (its all-gather needs two ranks):
    the check is that hypergrad's functional passes and buffer policy run through the converted module."""
    plain, _, _ = conv_problem(DEV)
    run_steps(plain, DEV)
    sync_net = lambda: nn.SyncBatchNorm.convert_sync_batchnorm(conv_bn_net())
    synced, inner, _ = conv_problem(DEV, net=sync_net)
    assert isinstance(inner[1], nn.SyncBatchNorm)
    run_steps(synced, DEV)
    assert_states_close(synced.state_dict(), plain.state_dict(), rtol=1e-12)
    assert int(inner[1].num_batches_tracked) == 4


#: documented accuracy (docs/fsdp.md, tests/test_fsdp_problem.py) of each sharded route in float64
FSDP_ROUTES = {
    "exact_gathered": ("rev_rev", True, 1e-8),
    "exact": ("auto", True, 1e-8),
    "finite_diff": ("auto", False, 1e-6),  # the default route without a dense twin
}


def _fsdp_batches() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(11)
    return tuple((torch.randn(8, 5, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)) for _ in "io")


def _fsdp_problem(mesh: Any, route: str) -> tuple[hypergrad.BilevelProblem, nn.Module, dict]:
    from torch.distributed.fsdp import fully_shard

    def G(i: nn.Module, o: Any, batch: Any) -> Tensor:
        return ((i(batch[0] * o["scale"]) - batch[1]) ** 2).mean()

    def F(i: nn.Module, o: Any, batch: Any) -> Tensor:
        return nn.functional.smooth_l1_loss(i(batch[0] * o["scale"]), batch[1]) + 0.1 * (o["scale"] ** 2).sum()

    torch.manual_seed(0)
    inner = mlp().to(F64)
    device = "cpu" if mesh is None else DEV
    if mesh is None:
        solver: Any = hypergrad.Dense()
        hvp_mode, twin = "rev_rev", None
    else:
        hvp_mode, with_twin, _ = FSDP_ROUTES[route]
        fully_shard(inner[0], mesh=mesh)
        fully_shard(inner, mesh=mesh)
        solver = CG(max_steps=300, rtol=1e-9 if route == "finite_diff" else 1e-13)
        twin = None
        if with_twin:
            with torch.device("meta"):
                twin = mlp().to(F64)
    outer = {"scale": nn.Parameter(torch.linspace(0.8, 1.2, 5, dtype=F64, device=device))}
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(inner, torch.optim.SGD(inner.parameters(), lr=0.1, momentum=0.9)),
        hypergrad.Level(outer, torch.optim.SGD(outer.values(), lr=0.5)),
        G,
        F,
        method=hypergrad.Implicit(solver=solver, damping=5.0, hvp_mode=hvp_mode, warm_start=True),
        dense_inner=twin,
    )
    return problem, inner, outer


def _full(t: Tensor) -> Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def _fsdp_run(problem: hypergrad.BilevelProblem, inner: nn.Module, outer: dict, device: str) -> dict:
    bi, bo = (_on(b, device) for b in _fsdp_batches())
    grad_record = problem.hypergradient(bo, hessian_batch=bi)
    first = {"scale": outer["scale"].grad.detach().cpu().clone()}
    problem.outer.optimizer.zero_grad()
    step_record = problem.step([bi], bo)
    assert not grad_record.skipped and not step_record.skipped
    return {
        "first_grad": first,
        "inner": {k: _full(p) for k, p in inner.named_parameters()},
        "outer": {"scale": outer["scale"].detach().cpu()},
        "status": step_record.solve.status if step_record.solve else None,
    }


@pytest.fixture(scope="module")
def fsdp_reference() -> dict:
    """The unsharded problem on the CPU in float64 (``Dense`` solves, ``rev_rev`` products)."""
    problem, inner, outer = _fsdp_problem(None, "")
    return _fsdp_run(problem, inner, outer, "cpu")


@pytest.mark.parametrize("route", list(FSDP_ROUTES))
def test_fsdp2_routes_equal_the_unsharded_dense_reference(process_group: str, fsdp_reference: dict, route: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(DEVICE_TYPE, (1,))
    problem, inner, outer = _fsdp_problem(mesh, route)
    assert problem._sharded is not None and problem._sharded.mode.startswith(route)
    assert all(hasattr(p, "full_tensor") and p.device.type == DEVICE_TYPE for p in inner.parameters())
    got = _fsdp_run(problem, inner, outer, DEV)
    assert got["status"] == "success"
    tol = FSDP_ROUTES[route][2]
    assert rel(got["first_grad"], fsdp_reference["first_grad"]) <= tol
    assert rel(got["outer"], fsdp_reference["outer"]) <= tol
    assert rel(got["inner"], fsdp_reference["inner"]) <= tol
