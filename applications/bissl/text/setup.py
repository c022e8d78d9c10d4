"""Build the tokenizer + causal LM of a text run, and its data tensors (shared by every text stage)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed import device_of
from .config import TextConfig
from .corpora import TextTask, load_task
from .model import PretextLM, add_lora, build_gpt, check_context, check_vocab, load_causal_lm, split_lm
from .tokenizer import CharTokenizer, Tokenizer, encode_batch, load_tokenizer

__all__ = ["device_of", "load_lm", "TaskTensors", "task_tensors", "subset"]

_TOKENIZER_FILES = (CharTokenizer.FILE, "tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_lm(cfg: TextConfig, model_dir: str | None = None) -> tuple[nn.Module, PretextLM, Tokenizer]:
    """The causal LM (from ``model_dir``, ``cfg.model.model_path`` or a fresh GPT-2), its
    :class:`~applications.bissl.text.model.PretextLM` view and its tokenizer, checked against each other.

    The tokenizer is ``cfg.model.tokenizer_path``, else the model folder's own, else the character
    tokenizer. Raises ``ValueError`` / ``FileNotFoundError`` naming the offending flag.
    """
    m = cfg.model
    path = model_dir or m.model_path
    if path is not None:
        model = load_causal_lm(path)
        tok_path = m.tokenizer_path
        if tok_path is None and any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            tok_path = path
        tok = load_tokenizer(tok_path)
    else:
        tok = load_tokenizer(m.tokenizer_path)
        model = build_gpt(
            tok.vocab_size, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, n_positions=m.seq_len, seed=cfg.seed
        )
    check_vocab(tok, model)
    check_context(m.seq_len, model)
    return model, split_lm(model, tok.pad_id), tok


def maybe_lora(cfg: TextConfig, lm: PretextLM) -> None:
    """``--lora-rank r > 0``: adapters in the backbone, everything else (the LM head too) frozen."""
    if cfg.model.lora_rank:
        add_lora(lm.backbone, cfg.model.lora_rank, cfg.model.lora_alpha, seed=cfg.seed)
        lm.lm_head.requires_grad_(False)


@dataclass(frozen=True)
class TaskTensors:
    """A task encoded for the model: ``[N, seq_len]`` ids and ``[N]`` labels per split."""

    task: TextTask
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def subset(n: int, cap: int | None, seed: int) -> Tensor:
    """Sorted seeded random ``cap`` indices of ``range(n)`` (all when ``cap`` is ``None`` or >= n)."""
    if cap is None or cap >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def task_tensors(cfg: TextConfig, spec: str, tok: Tokenizer) -> TaskTensors:
    """Load ``spec`` (:func:`~applications.bissl.text.corpora.load_task`), cap it, encode it."""
    t = load_task(spec, cfg.data_root, text_column=cfg.text_column, label_column=cfg.label_column, seed=cfg.seed)
    tr = subset(len(t.train_texts), cfg.max_train_samples, cfg.seed)
    test_cap = cfg.max_test_samples if cfg.max_test_samples is not None else cfg.max_train_samples
    te = subset(len(t.test_texts), test_cap, cfg.seed + 1)
    L = cfg.model.seq_len
    return TaskTensors(
        t,
        encode_batch(tok, [t.train_texts[i] for i in tr.tolist()], L),
        torch.tensor([t.train_labels[i] for i in tr.tolist()]),
        encode_batch(tok, [t.test_texts[i] for i in te.tolist()], L),
        torch.tensor([t.test_labels[i] for i in te.tolist()]),
    )
