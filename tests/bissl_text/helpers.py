"""Tiny float64 GPTs and batches shared by the text BiSSL tests."""

from __future__ import annotations

import copy

import torch

from applications.bissl.bilevel import PretextBatch, build_problem
from applications.bissl.config import BiSSLConfig, paper_method
from applications.bissl.models import LinearHead
from applications.bissl.text.model import add_lora, build_gpt, split_lm
from tests.bissl.conftest import pop_method_kwargs

VOCAB, PAD = 7, 0


def tiny_lm(*, lora: int = 0, seed: int = 0):
    """A 1-layer GPT-2 (d=4, 2 heads, SDPA attention) in float64 as a PretextLM; LoRA adapters random."""
    model = build_gpt(VOCAB, n_layer=1, n_embd=4, n_head=2, n_positions=6, seed=seed)
    lm = split_lm(model, PAD)
    if lora:
        add_lora(lm.backbone, lora, seed=seed, init=False)
        lm.lm_head.requires_grad_(False)
    return lm.double()


def batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xp = torch.randint(1, VOCAB, (3, 5), generator=g)
    yp = torch.randint(1, VOCAB, (3, 5), generator=g)
    xd = torch.randint(1, VOCAB, (4, 5), generator=g)
    xd[1, 3:] = PAD  # a padded document: the mask reaches attention and pooling
    xd[3, 2:] = PAD
    yd = torch.randint(0, 3, (4,), generator=g)
    return PretextBatch(xp, yp, local_negatives=True), (xd, yd)


def tiny_problem(*, lora: int = 0, **cfg_kw):
    lower = tiny_lm(lora=lora)
    upper = copy.deepcopy(lower.backbone)
    with torch.no_grad():  # theta_D != theta_P
        for p in upper.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    head = LinearHead(4, 3).double()
    method = pop_method_kwargs(cfg_kw)
    cfg = BiSSLConfig(**{"clip_norm": 1e9, **cfg_kw}, method=paper_method(**method))
    problem = build_problem(
        lower,
        upper,
        head,
        cfg,
        lower_opt=torch.optim.SGD([p for p in lower.parameters() if p.requires_grad], lr=1.0),
        upper_opt=torch.optim.SGD([p for p in [*upper.parameters(), *head.parameters()] if p.requires_grad], lr=1.0),
    )
    return problem, lower, upper, head, cfg
