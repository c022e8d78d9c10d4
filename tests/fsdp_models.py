"""Small models and losses shared by the FSDP2 tests, the worker they spawn and the memory benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def mlp() -> nn.Module:
    # Widths 7 and 3 do not divide by 2 ranks: FSDP2 pads the uneven shards.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def sharded_mlp(mesh: object) -> nn.Module:
    """The float64 :func:`mlp` (seed 0) with its first layer and the root each ``fully_shard``-ed on ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = mlp().double()
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


class TinyTransformer(nn.Module):
    """One pre-norm (bidirectional) self-attention block with an MLP, mean-pooled to ``out`` outputs."""

    def __init__(self, d_in: int = 5, d: int = 8, heads: int = 2, out: int = 3):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(d_in, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, tokens, d_in)
        h = self.inp(x)
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward
            a = F.scaled_dot_product_attention(q, k, v)  # no causal mask: a plain mask tensor cannot mix with DTensors
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = h + self.ff(self.ln2(h))
        return self.head(h.mean(dim=1))


def inner_loss(module: nn.Module, h: dict, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error with the inputs scaled by the hyper-parameter ``h['scale']`` (if given)."""
    if "scale" in h:
        x = x * h["scale"]
    return ((module(x) - y) ** 2).mean()


def outer_loss(module: nn.Module, h: dict, x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute-ish (smooth L1) validation error; depends on ``h`` directly too."""
    if "scale" in h:
        x = x * h["scale"]
    return F.smooth_l1_loss(module(x), y)


def data(seed: int, n: int, kind: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A global batch of ``n`` samples, identical on every rank (each rank slices its part)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind == "mlp" else (n, 4, 5)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)
