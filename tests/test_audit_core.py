"""Adversarial audit of the core public API: each test is a probe that once gave a silent wrong result or a
misleading error (see the CHANGELOG's "Fixed" bullets of the audit)."""

from __future__ import annotations

import re

import pytest
import torch

import hypergrad
from hypergrad import CG, MINRES, PCG, Dense, FixedPoint, Identity, Neumann, Nystrom, RecycledLanczos

F64 = torch.float64


def _diag() -> torch.Tensor:
    return torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))


# --- solvers: an Inf in the right-hand side made every tolerance infinite, so x = 0 was a "success" -----------


@pytest.mark.parametrize(
    "solver",
    [
        CG(max_steps=5, rtol=1e-8),
        MINRES(max_steps=5, rtol=1e-8),
        Neumann(max_steps=5, alpha=0.3, rtol=1e-8),
        FixedPoint(max_steps=5, rtol=1e-8),
        PCG(preconditioner=Nystrom(rank=1), max_steps=5, rtol=1e-8),
        RecycledLanczos(basis_size=1, max_steps=5, rtol=1e-8),
    ],
    ids=lambda s: type(s).__name__,
)
def test_inf_right_hand_side_is_nonfinite_not_success(solver: hypergrad.AbstractLinearSolver) -> None:
    A = _diag()
    b = torch.tensor([1.0, float("inf"), 1.0], dtype=F64)
    sol = solver(lambda v: A @ v, b)
    assert sol.status is hypergrad.Status.NONFINITE
    assert sol.failed
    with pytest.raises(hypergrad.SolverError, match="nonfinite"):
        sol.raise_if_failed(solver)


# --- functional API: a failed solve with a NaN solution was returned under on_failure="warn" -----------------


def _singular_inner(p: dict, h: dict) -> torch.Tensor:  # Hessian 2 * ones(3, 3): rank one
    return (p["w"].sum() - h["lam"].sum()) ** 2


def _F(p: dict, h: dict) -> torch.Tensor:
    return 0.5 * (p["w"] ** 2).sum()


def _point() -> tuple[dict, dict]:
    return {"w": torch.ones(3, dtype=F64)}, {"lam": torch.ones(3, dtype=F64)}


def test_singular_dense_solve_is_refused_under_warn_and_returned_under_apply() -> None:
    params, hparams = _point()
    with pytest.raises(hypergrad.SolverError, match="'singular'.*Dense"):
        hypergrad.implicit_grad(_singular_inner, _F, params, hparams, solver=Dense())
    res = hypergrad.implicit_grad(_singular_inner, _F, params, hparams, solver=Dense(), on_failure="apply")
    assert res.solution.status is hypergrad.Status.SINGULAR
    assert not bool(torch.isfinite(res.grad["lam"]).any())


def test_custom_root_singular_jacobian_is_refused() -> None:
    # T(x, a) = x^2 - a at x = 0: dT/dx = 0, so Dense returns NaN with status 'singular'
    f = hypergrad.custom_root(lambda x, a: x**2 - a, solver=Dense())(lambda a: torch.zeros_like(a))
    a = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(hypergrad.SolverError, match="singular"):
        torch.autograd.grad(f(a).sum(), a)


# --- functional API: a non-finite outer gradient (finite loss) or an infinite mixed derivative --------------


def _G(p: dict, h: dict) -> torch.Tensor:
    return 0.5 * ((p["w"] - h["lam"]) ** 2).sum() + 0.1 * (p["w"] ** 2).sum()


@pytest.mark.parametrize("solver", [Identity(), CG(max_steps=5)], ids=lambda s: type(s).__name__)
def test_outer_gradient_inf_wrt_params_is_refused(solver: hypergrad.AbstractLinearSolver) -> None:
    params = {"w": torch.zeros(3, dtype=F64)}  # d sqrt(w) / dw = inf at 0, sqrt(0) = 0 is finite
    hparams = {"lam": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match=r"gradient of `outer_loss` with respect to `params` \['w'\] is non-finite"):
        hypergrad.implicit_grad(_G, lambda p, h: torch.sqrt(p["w"]).sum(), params, hparams, solver=solver)


def test_outer_gradient_inf_wrt_hparams_is_refused() -> None:
    params, hparams = {"w": torch.ones(3, dtype=F64)}, {"lam": torch.zeros(3, dtype=F64)}
    with pytest.raises(ValueError, match=r"with respect to `hparams` \['lam'\]"):
        hypergrad.implicit_grad(
            _G, lambda p, h: _F(p, h) + torch.sqrt(h["lam"]).sum(), params, hparams, solver=CG(max_steps=5)
        )


def test_fixed_point_outer_gradient_inf_is_refused() -> None:
    params, hparams = {"w": torch.zeros(3, dtype=F64)}, {"lam": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match="`outer_loss`.*non-finite"):
        hypergrad.fixed_point_grad(
            lambda p, h: {"w": 0.5 * p["w"] + h["lam"]},
            lambda p, h: torch.sqrt(p["w"]).sum(),
            params,
            hparams,
            solver=FixedPoint(max_steps=5),
        )


def _inf_mixed(p: dict, h: dict) -> torch.Tensor:  # d2G/dlam dw = -1 + w / sqrt(lam): inf at lam = 0
    return 0.5 * ((p["w"] - h["lam"]) ** 2).sum() + (torch.sqrt(h["lam"]) * p["w"] ** 2).sum()


def test_infinite_mixed_derivative_is_refused_and_returned_under_apply() -> None:
    params, hparams = {"w": torch.ones(3, dtype=F64)}, {"lam": torch.zeros(3, dtype=F64)}
    solver = CG(max_steps=5, rtol=1e-10)
    with pytest.raises(hypergrad.NonFiniteError, match=r"hypergradient is non-finite .* \['lam'\].*'success'"):
        hypergrad.implicit_grad(_inf_mixed, _F, params, hparams, solver=solver)
    res = hypergrad.implicit_grad(_inf_mixed, _F, params, hparams, solver=solver, on_failure="apply")
    assert res.solution.status is hypergrad.Status.SUCCESS
    assert not bool(torch.isfinite(res.grad["lam"]).any())


# --- BilevelProblem: a first step whose inner steps were all skipped blamed a missing Hessian batch ----------


def _problem(warm_start: bool = False) -> tuple[hypergrad.BilevelProblem, torch.nn.Linear]:
    torch.manual_seed(0)
    w, lam = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(3, 1, bias=False)
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(w, torch.optim.SGD(w.parameters(), lr=0.4)),
        hypergrad.Level(lam, torch.optim.SGD(lam.parameters(), lr=0.25)),
        lambda i, o, x: ((i.weight - o.weight) ** 2).sum(),
        lambda i, o, x: ((i.weight - 2.0) ** 2).sum(),
        hypergrad.Implicit(solver=CG(max_steps=3), warm_start=warm_start),
    )
    return problem, w


def test_step_after_skipped_inner_steps_names_the_skip() -> None:
    problem, w = _problem()
    with torch.no_grad():
        w.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"this call's inner steps were skipped: the inner loss is nan"):
        problem.step([None, None], None)
    assert problem.inner_skipped == 2 and problem.inner_steps == 0


@pytest.mark.parametrize("which", ["inner", "outer"])
def test_a_step_that_overflows_the_parameters_raises_at_once(which) -> None:
    # was: the parameters became inf/nan with a finite gradient; every later step was skipped instead
    problem, w = _problem()
    level = problem.inner if which == "inner" else problem.outer
    for group in level.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(hypergrad.NonFiniteError, match=rf"the {which} optimiser step made the {which} parameters"):
        problem.step([None, None], None)
    assert not all(bool(torch.isfinite(p).all()) for p in level.module.parameters())  # what the message says


# --- checkpoints: a bad map_location was reported as a damaged file to delete --------------------------------


@pytest.fixture
def saved(tmp_path):
    return hypergrad.save_checkpoint({"w": torch.ones(2)}, tmp_path / "c.pt")


@pytest.mark.parametrize(
    ("map_location", "exc", "regex"),
    [
        ("gpu0", ValueError, "`map_location` 'gpu0' is not a device"),
        (3, TypeError, r"`map_location` must be None, a device string .* got 3 \(int\)"),
        ("meta", ValueError, "`map_location` 'meta' would load tensors without data"),
    ],
)
def test_bad_map_location_is_an_argument_error(saved, map_location, exc, regex) -> None:
    with pytest.raises(exc, match=regex) as info:
        hypergrad.load_checkpoint(saved, map_location=map_location)
    assert not isinstance(info.value, hypergrad.CheckpointError)
    assert "Delete it" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_device_is_not_a_damaged_file(saved) -> None:
    with pytest.raises(
        ValueError, match=re.escape("`map_location` 'cuda:0' names a CUDA device this process does not")
    ):
        hypergrad.load_checkpoint(saved, map_location=torch.device("cuda:0"))
    with pytest.raises(hypergrad.CheckpointError, match="the file itself may be fine") as info:
        hypergrad.load_checkpoint(saved, map_location={"cpu": "cuda:0"})
    assert "damaged" not in str(info.value)


def test_weights_only_must_be_bool(saved) -> None:
    with pytest.raises(TypeError, match=r"`weights_only` must be True or False, got 'yes'"):
        hypergrad.load_checkpoint(saved, weights_only="yes")


# --- BilevelProblem: parameters frozen after construction ----------------------------------------------------


def test_inner_parameters_frozen_after_construction_are_named() -> None:
    problem, w = _problem()
    w.weight.requires_grad_(False)  # was: a raw "One of the differentiated Tensors does not require grad"
    with pytest.raises(ValueError, match=r"`inner` parameters \['weight'\] were frozen \(requires_grad=False\)"):
        problem.step([None], None)
    with pytest.raises(ValueError, match=r"`inner` parameters \['weight'\]"):
        problem.inner_step(None)


def test_outer_parameters_frozen_after_construction_are_not_stepped() -> None:
    problem, w = _problem()
    problem.inner_step(None)
    lam = problem.outer.module.weight
    before = lam.detach().clone()
    lam.requires_grad_(False)  # was: the outer step updated the frozen tensor anyway
    with pytest.raises(ValueError, match=r"`outer` parameters \['weight'\] were frozen"):
        problem.step([None], None)
    with pytest.raises(ValueError, match=r"`outer` parameters \['weight'\] were frozen"):
        problem.outer_step(None)
    assert torch.equal(lam, before)


# --- operators, trees, preconditioners, Dense: smaller findings -----------------------------------------------


@pytest.mark.parametrize("mode", ["rev_rev", "rev_rev_cached", "auto"])
def test_hvp_of_a_function_constant_in_params_is_zero_in_every_mode(mode: str, recwarn) -> None:
    params = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    out = hypergrad.hvp(lambda p: torch.tensor(3.0, dtype=F64), params, {"w": torch.ones(2, dtype=F64)}, mode=mode)
    torch.testing.assert_close(out["w"], torch.zeros(2, dtype=F64))
    assert not [w for w in recwarn if issubclass(w.category, hypergrad.HVPFallbackWarning)]


@pytest.mark.parametrize("cls", [Nystrom, hypergrad.HutchinsonDiagonal])
@pytest.mark.parametrize("seed", [None, 1.5, "0", -1])
def test_preconditioner_seed_is_checked_at_construction(cls, seed) -> None:
    with pytest.raises(
        ValueError, match=rf"{cls.__name__}: `seed` must be an integer >= 0, got {re.escape(repr(seed))}"
    ):
        cls(seed=seed)


@pytest.mark.parametrize("dtype", ["float64", torch.int64])
def test_tree_cast_refuses_a_non_floating_dtype(dtype) -> None:
    with pytest.raises(
        TypeError, match=rf"tree_cast: `dtype` must be a floating torch.dtype .* got {re.escape(repr(dtype))}"
    ):
        hypergrad.tree_cast({"w": torch.full((2,), 1.7)}, dtype)


def test_dense_solves_an_empty_system() -> None:
    b = {"w": torch.zeros(0, 3, dtype=F64)}
    sol = Dense()(lambda v: {"w": 2 * v["w"]}, b)
    assert sol.status is hypergrad.Status.SUCCESS and sol.x["w"].shape == (0, 3)


def test_load_state_dict_refuses_a_non_finite_warm_start() -> None:
    # was: loaded, then every later hypergradient was skipped as a "non-finite solve", forever
    problem, _ = _problem(warm_start=True)
    lam = problem.outer.module
    problem.step([None], None)
    state = problem.state_dict()
    assert state["warm_start"] is not None
    state["warm_start"]["weight"][0, 1] = float("nan")
    before = lam.weight.detach().clone()
    with pytest.raises(ValueError, match=r"warm_start\['weight'\] has non-finite values"):
        problem.load_state_dict(state)
    assert torch.equal(lam.weight, before)


# --- stateless: a forward that writes a buffer in place changed the module (plain autograd) or failed (torch.func)


class _Counting(torch.nn.Module):
    """A linear map whose forward counts its calls in a buffer (like spectral norm's power iteration)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1, bias=False).double()
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("mode", ["rev_rev_cached", "fwd_rev"])
def test_stateless_never_writes_the_modules_buffers(mode: str) -> None:
    torch.manual_seed(0)
    m, x = _Counting(), torch.randn(4, 3, dtype=F64)
    f = hypergrad.stateless(m)
    params = hypergrad.module_params(m)
    loss = lambda p: (f(p, x) ** 2).sum()
    out = hypergrad.hvp(loss, params, {"lin.weight": torch.ones(1, 3, dtype=F64)}, mode=mode)
    torch.testing.assert_close(out["lin.weight"], 2 * (x.T @ x @ torch.ones(3, 1, dtype=F64)).T)  # H = 2 X^T X
    assert m.calls.item() == 0


def test_problem_hypergradient_leaves_a_written_buffer_alone() -> None:
    torch.manual_seed(0)
    w, lam = _Counting(), torch.nn.Linear(3, 1, bias=False).double()
    problem = hypergrad.BilevelProblem(
        hypergrad.Level(w, torch.optim.SGD(w.parameters(), lr=0.1)),
        hypergrad.Level(lam, torch.optim.SGD(lam.parameters(), lr=0.1)),
        lambda i, o, x: ((i(x) - o(x)) ** 2).mean() + 0.1 * (i.lin.weight**2).sum(),
        lambda i, o, x: ((i(x) - 1.0) ** 2).mean(),
        hypergrad.Implicit(solver=CG(max_steps=3), hvp_mode="fwd_rev"),  # was: torch.func refused the write
    )
    x = torch.randn(4, 3, dtype=F64)
    record = problem.step([x], x)
    assert record.outer_steps == 1 and w.calls.item() == 1  # the inner step's own forward only


def test_custom_root_shape_error_shows_the_shapes_it_got() -> None:
    # was: "... (keys ['x'], shapes [(2,)]), got keys ['x']." (the same keys: the shape was the problem)
    f = hypergrad.custom_root(lambda x, a: (x - a).sum(), solver=Dense())(lambda a: a.detach().clone())
    with pytest.raises(ValueError, match=re.escape("got keys ['x'], shapes [()]")):
        f(torch.ones(2, dtype=F64, requires_grad=True))


@pytest.mark.parametrize(
    ("build", "exc", "regex"),
    [  # was: AttributeError 'Tensor' object has no attribute 'items'; tree_map's `tree`; raw torch errors
        (
            lambda: hypergrad.HessianOperator(lambda p: (p**2).sum(), torch.ones(2)),
            TypeError,
            "`params` must be a dict",
        ),
        (
            lambda: hypergrad.FixedPointOperator(lambda p, h: p, [torch.ones(2)], {"b": torch.ones(1)}),
            TypeError,
            "`params` must be a dict",
        ),
        (
            lambda: hypergrad.FixedPointOperator(lambda p, h: p, {"w": torch.ones(2)}, torch.ones(1)),
            TypeError,
            "`hparams` must be a dict",
        ),
        (
            lambda: hypergrad.FixedPointOperator(
                lambda p, h: p, {"w": torch.ones(2, dtype=torch.long)}, {"b": torch.ones(1)}
            ),
            TypeError,
            r"`params\['w'\]` has dtype torch.int64",
        ),
        (
            lambda: hypergrad.FixedPointOperator(lambda p, h: p, {}, {"b": torch.ones(1)}),
            ValueError,
            "`params` is empty",
        ),
    ],
)
def test_operators_check_their_trees(build, exc, regex) -> None:
    with pytest.raises(exc, match=regex):
        build()


def test_implicit_grad_validate_must_be_bool() -> None:
    params, hparams = _point()  # was: validate="no" ran the validation (a truthy string)
    with pytest.raises(TypeError, match=r"`validate` must be True or False, got 'no'"):
        hypergrad.implicit_grad(_G, _F, params, hparams, solver=CG(max_steps=3), validate="no")


def test_save_checkpoint_of_an_unpicklable_state_names_state(saved) -> None:
    # was: a raw AttributeError / TypeError from pickle deep in torch.save
    with pytest.raises(TypeError, match=r"`state` holds an object that cannot be saved .*Nothing was written"):
        hypergrad.save_checkpoint({"w": torch.zeros(2), "fn": lambda: 1}, saved)
    torch.testing.assert_close(hypergrad.load_checkpoint(saved)["w"], torch.ones(2))  # the old file is kept


def test_set_rng_state_with_a_malformed_entry_changes_nothing() -> None:
    bad = dict(hypergrad.get_rng_state())
    bad["python"] = (1, 2)
    torch.manual_seed(123)  # the torch state now differs from bad["torch"]
    before = torch.get_rng_state()
    with pytest.raises(TypeError, match=r"`state\['python'\]` is not a generator state .*no generator was changed"):
        hypergrad.set_rng_state(bad)
    assert torch.equal(torch.get_rng_state(), before)  # was: torch's generator set, then a raw TypeError
