r"""``--fsdp`` for the text BiSSL stage: the GPT backbones ``fully_shard``-ed (FSDP2), launched with torchrun.

The image stage's recipe (:mod:`applications.bissl.fsdp`) on a causal LM: the transformer body of the
lower backbone :math:`\theta_P` and of the upper backbone :math:`\theta_D` is wrapped with
``torch.distributed.fsdp.fully_shard`` - each transformer block (GPT-2's ``h[i]``), then the body -
on a 1-D device mesh over all ranks. The LM head and the downstream linear head :math:`\phi` stay
plain and replicated (mixed levels, docs/fsdp.md). The exact Hessian-vector products run on the
gathered weights (hypergrad's ``"exact_gathered"`` route) through :func:`text_dense_twin`, an
unsharded copy of the :class:`~applications.bissl.text.model.PretextLM` on the meta device; hypergrad
runs them under the ``MATH`` attention backend itself (the fused attention kernels have no double
backward), as it does for unsharded models.

The body (``TextBackbone.body``), not the ``TextBackbone``, is the sharded root: the pretext loss
calls ``backbone.hidden`` and FSDP2 gathers a module's parameters in its ``forward`` hooks, which the
body's ``forward`` runs on every path.

With ``--lora-rank`` the peft adapters sit inside the sharded blocks beside their frozen base
weights (FSDP2 shards both; only the adapters train and are coupled). Refused, as in the image
stage: a run without a process group (launch with torchrun) and resuming a stage (no
per-alternation checkpoint under ``--fsdp``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..fsdp import shard_backbone
from .model import PretextLM, TextBackbone

__all__ = ["transformer_blocks", "shard_text_stage", "text_dense_twin"]


def transformer_blocks(body: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM's body: the children of its longest ``nn.ModuleList``.

    (GPT-2: ``body.h``; Llama-like models: ``body.layers``.) Empty when the body has none.

    Example:
        >>> from applications.bissl.text.model import build_gpt
        >>> len(transformer_blocks(build_gpt(29, n_layer=3, n_embd=8, n_head=2, n_positions=16).transformer))
        3
    """
    best: list[nn.Module] = []
    for m in body.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best):
            best = list(m)
    return best


def _shard_text_backbone(backbone: TextBackbone, mesh: Any) -> None:
    shard_backbone(backbone.body, mesh, blocks=transformer_blocks(backbone.body))


def shard_text_stage(lower: PretextLM, upper: TextBackbone, mesh: Any) -> None:
    """Shard the lower backbone (inside ``lower``) and the upper backbone alike, block by block; heads stay plain.

    The same wrapping on both levels makes the proximal coupling pair shards of equal placement.
    """
    _shard_text_backbone(lower.backbone, mesh)
    _shard_text_backbone(upper, mesh)


def text_dense_twin(lower: PretextLM) -> nn.Module:
    """An unsharded copy of ``lower`` on the meta device (no memory): the problem's ``dense_inner``.

    Call before sharding. Its parameter names are ``lower``'s (``fully_shard`` keeps names), so the
    exact products evaluate the pretext loss on it with the gathered weights.
    """
    twin = copy.deepcopy(lower)
    return twin.to(torch.device("meta"))
