"""Models for the HVP-mode benchmarks: an MLP, a small ResNet with BatchNorm, a small transformer.

Each builder returns a :class:`ModelCase`: a pure loss ``fn(params) -> scalar`` over a fixed batch
(built with :func:`hypergrad.stateless`, so BatchNorm uses batch statistics and its running
statistics are never mutated inside ``torch.func`` transforms) and the parameter tree.

The transformer's attention runs inside ``sdpa_kernel(SDPBackend.MATH)``: the fused CPU/CUDA
kernels of ``scaled_dot_product_attention`` support neither forward-mode AD nor double backward,
the math backend supports both, so every HVP mode works on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.models.resnet import BasicBlock

import hypergrad

__all__ = ["ModelCase", "MODELS", "build_model", "SmallResNet", "TinyTransformer"]


@dataclass
class ModelCase:
    """A model and a batch, as a pure function of the parameters.

    Attributes:
        name: registry key.
        fn: ``fn(params) -> scalar loss`` on a fixed batch (pure; safe under ``torch.func``).
        params: the parameter tree, detached, on ``device``.
        device: where everything lives.
        description: one line for the report (sizes).
    """

    name: str
    fn: Callable[[dict[str, Tensor]], Tensor]
    params: dict[str, Tensor]
    device: torch.device
    description: str

    @property
    def num_params(self) -> int:
        """Number of scalar parameters."""
        return sum(p.numel() for p in self.params.values())


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet built from torchvision's ``BasicBlock`` (one block per stage).

    Args:
        widths: channels per stage, e.g. ``(16, 32, 64)``; each later stage halves the resolution.
        in_channels: input channels.
        num_classes: output logits.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, prev = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or prev != w:
                down = nn.Sequential(nn.Conv2d(prev, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
            blocks.append(BasicBlock(prev, w, stride=stride, downsample=down))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, shape ``(batch, num_classes)`` for input ``(batch, in_channels, H, W)``."""
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.MATH):  # the backend with forward-mode AD and double backward
            att = nnf.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A causal character-level transformer (pre-LayerNorm blocks, learned positions).

    Args:
        vocab: vocabulary size.
        dim: model width (divisible by ``heads``).
        heads: attention heads.
        layers: blocks.
        context: maximum sequence length.
    """

    def __init__(self, vocab: int = 32, dim: int = 32, heads: int = 2, layers: int = 2, context: int = 32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(context, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(batch, T, vocab)`` for token ids ``(batch, T)``."""
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.out(self.ln(self.blocks(h)))


# preset -> model -> sizes
_SIZES = {
    "small": {
        "mlp": dict(inp=16, hidden=32, depth=2, batch=16),
        "resnet": dict(widths=(4, 8), hw=8, batch=4),
        "transformer": dict(dim=16, heads=2, layers=1, seq=8, batch=4, vocab=16),
    },
    "full": {
        "mlp": dict(inp=256, hidden=512, depth=3, batch=128),
        "resnet": dict(widths=(16, 32, 64), hw=32, batch=32),
        "transformer": dict(dim=64, heads=4, layers=2, seq=64, batch=16, vocab=64),
    },
}


def _mlp(s: dict, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> ModelCase:
    layers: list[nn.Module] = []
    width = s["inp"]
    for _ in range(s["depth"]):
        layers += [nn.Linear(width, s["hidden"]), nn.Tanh()]
        width = s["hidden"]
    net = nn.Sequential(*layers, nn.Linear(width, 10)).to(device=device, dtype=dtype)
    x = torch.randn(s["batch"], s["inp"], generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (s["batch"],), generator=gen).to(device)
    f = hypergrad.stateless(net)
    case = ModelCase(
        "mlp",
        lambda p: nnf.cross_entropy(f(p, x), y),
        hypergrad.module_params(net),
        device,
        f"MLP {s['inp']}-{s['hidden']}x{s['depth']}-10 (tanh), batch {s['batch']}",
    )
    return case


def _resnet(s: dict, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> ModelCase:
    net = SmallResNet(s["widths"]).to(device=device, dtype=dtype).train()
    x = torch.randn(s["batch"], 3, s["hw"], s["hw"], generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (s["batch"],), generator=gen).to(device)
    f = hypergrad.stateless(net, buffers="batch_stats")
    return ModelCase(
        "resnet",
        lambda p: nnf.cross_entropy(f(p, x), y),
        hypergrad.module_params(net),
        device,
        f"ResNet (torchvision BasicBlock, BatchNorm in batch-stats mode) widths {s['widths']}, "
        f"input {s['batch']}x3x{s['hw']}x{s['hw']}",
    )


def _transformer(s: dict, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> ModelCase:
    net = TinyTransformer(s["vocab"], s["dim"], s["heads"], s["layers"], s["seq"]).to(device=device, dtype=dtype)
    idx = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=gen).to(device)
    f = hypergrad.stateless(net)

    def loss(p: dict[str, Tensor]) -> Tensor:
        logits = f(p, idx[:, :-1])
        return nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

    return ModelCase(
        "transformer",
        loss,
        hypergrad.module_params(net),
        device,
        f"causal transformer d={s['dim']}, {s['layers']} layer(s), {s['heads']} heads, "
        f"{s['batch']}x{s['seq']} tokens (SDPA math backend)",
    )


MODELS: dict[str, Callable[[dict, torch.Generator, torch.device, torch.dtype], ModelCase]] = {
    "mlp": _mlp,
    "resnet": _resnet,
    "transformer": _transformer,
}


def build_model(
    name: str,
    preset: str = "small",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ModelCase:
    """Build the model case ``name`` at the sizes of ``preset`` ("small" or "full")."""
    if name not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; choose one of {sorted(MODELS)}.")
    if preset not in _SIZES:
        raise ValueError(f"build_model: unknown preset {preset!r}; choose 'small' or 'full'.")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation
    return MODELS[name](_SIZES[preset][name], gen, torch.device(device), dtype)
