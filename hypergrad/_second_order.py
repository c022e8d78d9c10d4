"""The backend of second-order passes: attention on a kernel that can be differentiated twice.

``F.scaled_dot_product_attention`` dispatches to fused kernels (flash and memory-efficient on GPU,
flash on CPU) that lack forward-mode AD and double backward. Every pass of hypergrad that
differentiates twice (Hessian-vector and mixed products, the fixed-point adjoint, the autograd
bridge's linearisation) therefore runs under :func:`second_order`, which selects the ``MATH``
backend (a composite of matmul and softmax, differentiable to any order). First-order passes (loss
values, gradients, the inner steps, finite-difference products) keep the fast kernels.

Cost: the ``MATH`` backend materialises the ``(L, S)`` attention matrix per head, so a second-order
pass through attention uses :math:`O(L S)` memory per head instead of :math:`O(L)`, and runs a
few times slower than the fused kernels on GPU; on CPU the difference is small.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["second_order", "attention_hint"]


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Run the enclosed passes with the ``MATH`` attention backend (twice differentiable)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def attention_hint(err: BaseException) -> str:
    """A sentence explaining an attention failure, or ``""`` when ``err`` is about something else."""
    text = str(err)
    if "scaled_dot_product" in text or "attention" in text:
        return (
            " The failing operator is an attention kernel without second-order support: hypergrad runs "
            "second-order passes under torch.nn.attention.sdpa_kernel(SDPBackend.MATH), so a model that "
            "forces another SDPA backend itself (its own sdpa_kernel context, or a custom fused "
            "attention) cannot be differentiated twice; let the model use the default dispatcher."
        )
    return ""
