r"""The pretext task: next-token prediction on the Shakespeare corpus, and its bits per character.

Batch :math:`k` of a run is ``batch_size`` windows of ``seq_len + 1`` tokens at positions drawn from
a generator seeded with ``(seed, k)``; under ``torchrun`` rank :math:`r` takes its contiguous share,
so a global batch is the same for any number of processes and after a resume.

Bits per character (``bpc``) = the mean next-token cross-entropy in nats over the held-out tail of
the corpus (non-overlapping windows), divided by :math:`\ln 2` (bits per *token* for a non-character
tokenizer).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from torch import Tensor

from hypergrad.distributed import world_size

from .. import distributed as dist_utils
from ..checkpoints import check_same_settings, run_settings
from ..optim import warmup_cosine
from .config import TextConfig
from .corpora import shakespeare_text
from .model import PretextLM
from .setup import device_of, load_lm
from .tokenizer import Tokenizer

__all__ = ["corpus_ids", "lm_batch", "bits_per_token", "pretrain_text"]


def corpus_ids(cfg: TextConfig, tok: Tokenizer) -> tuple[Tensor, Tensor]:
    """``(train_ids, eval_ids)``: the encoded corpus and its held-out tail of ``eval_chars`` characters."""
    p = cfg.pretrain
    text = shakespeare_text(p.max_chars)
    if len(text) < 2 * p.eval_chars:
        raise ValueError(f"the pretext corpus ({len(text)} chars) is shorter than twice `eval_chars` ({p.eval_chars}).")
    train, held = text[: -p.eval_chars], text[-p.eval_chars :]
    return torch.tensor(tok.encode(train), dtype=torch.long), torch.tensor(tok.encode(held), dtype=torch.long)


def lm_batch(ids: Tensor, seq_len: int, batch: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """This rank's share of global batch ``k``: ``(inputs, targets)``, each ``[batch / world, seq_len]``.

    Example:
        >>> x, y = lm_batch(torch.arange(100), 8, 4, k=0, seed=0)
        >>> x.shape, bool((y == x + 1).all())
        (torch.Size([4, 8]), True)
    """
    world, rank = world_size(), dist_utils.rank()
    if batch % world:
        raise ValueError(f"the pretext batch ({batch}) must be divisible by the number of processes ({world}).")
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
    per = batch // world
    starts = starts[rank * per : (rank + 1) * per]
    w = ids[starts[:, None] + torch.arange(seq_len + 1)]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def bits_per_token(lm: PretextLM, ids: Tensor, seq_len: int, batch: int = 64) -> float:
    """Mean next-token cross-entropy / ln 2 over non-overlapping windows of ``ids``."""
    dev = next(lm.parameters()).device
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    total = 0.0
    was = lm.training
    lm.eval()
    for i in range(0, n, batch):
        total += float(lm(x[i : i + batch].to(dev), y[i : i + batch].to(dev))) * len(x[i : i + batch])
    lm.train(was)
    return total / n / math.log(2)


def pretrain_text(cfg: TextConfig, *, resume: bool = True, echo=print) -> str:
    """Next-token pretraining (AdamW, warm-up + cosine, clip 1.0); returns the saved model folder.

    The folder (``<run_dir>/pretrain/model``) holds the model (``save_pretrained``), its tokenizer
    and ``pretrain.json`` with the bits per character before and after and the settings; with
    ``resume`` an existing model is returned when its settings are these, else :class:`ValueError`.
    """
    out = os.path.join(cfg.run_dir, "pretrain", "model")
    info_path = os.path.join(out, "pretrain.json")
    full = cfg.to_dict()  # what the saved model depends on (the LoRA variants share it)
    model = {k: v for k, v in full["model"].items() if k not in ("lora_rank", "lora_alpha")}
    settings = run_settings(model=model, pretrain=full["pretrain"], seed=cfg.seed)
    if resume and os.path.exists(info_path):
        with open(info_path) as f:
            check_same_settings(json.load(f).get("settings"), settings, info_path)  # never a stale model
        return out
    p, dev = cfg.pretrain, device_of(cfg)
    model, lm, tok = load_lm(cfg)
    lm.to(dev).train()
    train_ids, eval_ids = corpus_ids(cfg, tok)
    L = cfg.model.seq_len
    bpc0 = bits_per_token(lm, eval_ids, L)
    opt = torch.optim.AdamW(lm.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = warmup_cosine(opt, min(p.warmup_steps, p.steps), p.steps, 0.1)
    t0, loss = time.perf_counter(), torch.tensor(float("nan"))
    for k in range(p.steps):
        x, y = lm_batch(train_ids, L, p.batch_size, k, cfg.seed)
        loss = lm(x.to(dev), y.to(dev))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {k}; lower --pretrain-lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist_utils.average_gradients(lm.parameters())
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if dist_utils.is_main_process() and (k + 1) % max(1, p.steps // 5) == 0:
            echo(f"[pretrain] step {k + 1}/{p.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    bpc1 = bits_per_token(lm, eval_ids, L)
    if dist_utils.is_main_process():
        model.save_pretrained(out)
        tok.save(out)
        info = {"bpc_init": bpc0, "bpc": bpc1, "steps": p.steps, "time_s": time.perf_counter() - t0}
        info["settings"] = settings
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)
    dist_utils.barrier()
    return out
