r"""``--fsdp``: the BiSSL stage with its backbones ``fully_shard``-ed (PyTorch FSDP2), launched with torchrun.

Under ``--fsdp`` the lower backbone :math:`\theta_P` (inside the SSL model), the upper backbone
:math:`\theta_D` and, for BYOL, the target's backbone are wrapped with
``torch.distributed.fsdp.fully_shard`` - each residual block, then the backbone - on a 1-D device mesh
over all ranks (gloo on CPU, NCCL on CUDA). The projector, the predictor and the downstream head stay
plain and replicated: the two levels are *mixed* levels (docs/fsdp.md), whose plain gradients hypergrad
averages over ranks like data parallelism. The stage then runs through the same
:class:`hypergrad.BilevelProblem`, with exact Hessian-vector products on the gathered weights: an
unsharded twin of the SSL model on the meta device (:func:`dense_twin`) is the problem's
``dense_inner`` and ``--hvp-mode auto`` runs as ``rev_rev_cached`` (:func:`exact_method`), hypergrad's
``"exact_gathered"`` route - each rank differentiates its own pretext loss twice with the
all-gathered backbone, and the products are averaged over ranks, as in the data-parallel stage.
``--hvp-mode finite_diff`` keeps the products sharded (finite differences of backward passes) but is
unreliable on ReLU backbones in float32 (:func:`warn_kinked_fd`).

What changes against the data-parallel stage (and why):

* the head warm-up runs before the backbones are sharded (on an unsharded frozen copy, as without
  ``--fsdp``);
* no per-alternation stage checkpoint is written (the optimiser and warm-start states are sharded),
  so a stage is not resumed (refused: pass ``--no-resume``); ``lower_backbone.pt`` holds full
  (gathered) state dicts, loadable without FSDP;
* the diagnostic :math:`\|\nabla L_P\|` is the norm of the rank-averaged gradient (without
  ``--fsdp``: the mean over ranks of each rank's norm): ``--lam-mode target_share`` may pick a
  slightly different :math:`\lambda`;
* refused, with the reason: ``--damping-mode adaptive`` (its Lanczos runs ``torch.func`` Hessian
  products, which cannot see through ``fully_shard``), a run without a process group (launch with
  torchrun), and other ``--hvp-mode`` s (:data:`applications.bissl.config.FSDP_HVP_MODES`).

BatchNorm (every ResNet backbone has it) works in train mode: each rank normalises with its own
batch statistics, exactly as the data-parallel stage does (FSDP2 shards BatchNorm's weight and bias
and leaves its running statistics as plain replicated buffers).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import nn

from hypergrad.distributed import world_size

from . import distributed as dist_utils

__all__ = [
    "check_fsdp",
    "check_fsdp_fresh",
    "dense_twin",
    "exact_method",
    "full_state_dict",
    "shard_backbone",
    "shard_stage",
    "fsdp_mesh",
    "warn_kinked_fd",
]


def check_fsdp() -> None:
    """Refuse ``--fsdp`` without a process group (the configuration refuses unsupported settings itself)."""
    if not dist_utils.is_distributed():
        raise ValueError(
            "--fsdp shards the backbones over the ranks of a process group, but none is initialised: launch the "
            "stage with torchrun, e.g. `torchrun --nproc-per-node 2 -m applications.bissl bissl --preset tiny --fsdp` "
            "(gloo on CPU, NCCL on CUDA), or drop --fsdp."
        )


def check_fsdp_fresh(run: Any) -> None:
    """Refuse ``--fsdp`` when the stage's :class:`~applications.bissl.stage_run.StageRun` ``run`` would resume.

    A sharded stage writes no per-alternation checkpoint (its optimiser and warm-start state are
    sharded), so there is nothing it could resume from; the image and the text stage both call this.
    """
    if run.resumable:
        raise ValueError(
            f"--fsdp does not resume a stage: {run.checkpoint_path!r} exists, but a sharded stage writes no "
            "per-alternation checkpoint (its optimiser and warm-start state are sharded). Pass --no-resume."
        )


def fsdp_mesh(device: torch.device) -> Any:
    """A 1-D device mesh over every rank of the default process group (``device.type``: cpu or cuda)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size(),))


def shard_backbone(backbone: nn.Module, mesh: Any, blocks: Any = None) -> nn.Module:
    """``fully_shard`` each block of ``backbone``, then the backbone itself; returns ``backbone`` (wrapped in place).

    Args:
        backbone: the module to shard.
        mesh: the device mesh (:func:`fsdp_mesh`).
        blocks: the sub-modules to wrap first (e.g. a transformer's layers); ``None``: the residual
            blocks of a ResNet backbone (``layer1`` .. ``layer4``), none for other backbones.
    """
    from torch.distributed.fsdp import fully_shard

    if blocks is None:
        blocks = [
            block
            for name in ("layer1", "layer2", "layer3", "layer4")
            if isinstance(getattr(backbone, name, None), nn.Sequential)
            for block in getattr(backbone, name)
        ]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(backbone, mesh=mesh)
    return backbone


def param_groups(params: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """``params`` as optimiser parameter groups: the sharded (``DTensor``) ones apart from the plain ones.

    torch's multi-tensor (``foreach``) optimiser step, the default on CUDA, refuses one list that mixes
    DTensors and plain tensors ("got mixed torch.Tensor and DTensor"), and it runs per parameter
    group: a stage with a sharded backbone and a plain head gets the two kinds in two groups with the
    same hyperparameters, so the update is unchanged. Without DTensors: one group.

    Example:
        >>> import torch
        >>> [len(g["params"]) for g in param_groups([torch.zeros(2), torch.zeros(3)])]
        [2]
    """
    from torch.distributed.tensor import DTensor

    params = list(params)
    sharded = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    return [{"params": group} for group in (sharded, plain) if group]


def shard_stage(ssl: nn.Module, upper: nn.Module, mesh: Any) -> None:
    """Shard the stage's backbones alike: the lower one, the upper one and (BYOL) the target's.

    Lower and upper backbones get the same per-block wrapping, so the proximal coupling pairs shards
    of equal placement; the BYOL target's backbone is sharded like the online one so that its
    exponential moving average is a shard-by-shard update.
    """
    shard_backbone(ssl.backbone, mesh)
    shard_backbone(upper, mesh)
    target = getattr(ssl, "target", None)
    if target is not None:
        shard_backbone(target[0], mesh)
        # The root of a fully_shard-ed module keeps its gathered (plain) parameters after forward, for the
        # backward that follows; the target never runs backward, so reshard it at once (its EMA update
        # then pairs shards with shards).
        target[0].register_forward_hook(lambda module, args, output: module.reshard())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every ``DTensor`` gathered to its full tensor (collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict().items()
    }


def warn_kinked_fd(backbone: nn.Module) -> bool:
    """Warn (main process) when the finite-difference HVPs of ``--fsdp`` meet a ReLU backbone below float64.

    A finite difference whose step moves a ReLU unit across its kink picks up a jump of the gradient
    that the Hessian does not have; in float32 the step cannot be small enough to avoid it. Measured
    on the tiny preset's ResNet (``python -m benchmarks.fsdp_bissl_hvp_error``, docs/fsdp.md): relative
    error 2.1 per product in float32 (1.8e-7 in float64; 4.3e-2 with GELU in float32). Returns whether it warned.
    """
    kinked = any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)) for m in backbone.modules())
    low = any(p.dtype != torch.float64 for p in backbone.parameters())
    if not (kinked and low):
        return False
    if dist_utils.is_main_process():
        warnings.warn(
            "--fsdp: the Hessian-vector products of a fully_shard-ed backbone are finite differences of backward "
            "passes, and this backbone has ReLU kinks in float32: measured relative error about 2 per product on the "
            "tiny preset (docs/fsdp.md, `python -m benchmarks.fsdp_bissl_hvp_error`), so the Hessian term of the "
            "upper gradient is unreliable. Drop --hvp-mode finite_diff (the default, auto, gives exact products on "
            "the gathered weights), or use a smooth activation or float64.",
            UserWarning,
            stacklevel=2,
        )
    return True


def dense_twin(cfg: Any) -> nn.Module:
    """An unsharded SSL model of the stage's architecture on the meta device (no memory): the ``dense_inner`` twin.

    The exact Hessian products of ``--fsdp`` evaluate the pretext loss on it with the gathered weights
    (``hypergrad.BilevelProblem(dense_inner=...)``, route ``"exact_gathered"``).
    """
    from .pretrain import build_pretrain_model

    with torch.device("meta"):
        return build_pretrain_model(cfg)


def exact_method(method: Any) -> Any:
    """``method`` with ``hvp_mode="auto"`` made ``"rev_rev_cached"``: under FSDP2 with a twin, exact on gathered weights.

    (``"auto"`` with a twin would be the ``DTensor`` route, which the SimCLR/BYOL losses do not support.)
    """
    import dataclasses

    return dataclasses.replace(method, hvp_mode="rev_rev_cached") if method.hvp_mode == "auto" else method
