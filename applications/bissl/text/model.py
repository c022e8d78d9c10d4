r"""The language-model side of text BiSSL: a Hugging Face causal LM split into backbone and heads.

* :class:`TextBackbone` (:math:`\theta`): the transformer body of any causal LM
  (``model.base_model``, e.g. ``GPT2Model``); ``forward(ids)`` returns the hidden states
  mean-pooled over the non-pad positions, the features of the downstream linear head :math:`\phi`.
* :class:`PretextLM`: the lower level - backbone plus the LM head, **untied** from the input
  embeddings so that the proximal term :math:`\frac{\lambda}{2}\|\theta_P - \theta_D\|^2` covers the
  backbone only (as the projector in the image case); ``forward(inputs, targets)`` is the mean
  next-token cross-entropy :math:`L_P` (nats per token).

Models come from a config with random initialisation (:func:`build_gpt`, the offline default) or
from a local folder (:func:`load_causal_lm`, ``--model-path``; ``local_files_only``, nothing
downloads). Dropout is switched off: the Hessian-vector products of the BiSSL stage need a
deterministic loss. :func:`add_lora` puts ``peft`` LoRA adapters into the backbone and freezes
everything else, so both levels train (and the proximal term couples) the adapters only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TextBackbone",
    "PretextLM",
    "build_gpt",
    "load_causal_lm",
    "split_lm",
    "context_length",
    "check_vocab",
    "check_context",
    "add_lora",
]


class TextBackbone(nn.Module):
    """The transformer body :math:`\\theta`; ``forward(ids)`` = mean of the hidden states over non-pad tokens.

    Args:
        body: the base model of a causal LM (returns ``last_hidden_state``).
        pad_id: the padding token id (masked out of attention and of the pooling).
    """

    def __init__(self, body: nn.Module, pad_id: int):
        super().__init__()
        self.body = body
        self.pad_id = int(pad_id)
        self.out_dim = int(body.config.hidden_size)

    def hidden(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, T, d]`` last hidden states; ``mask`` (1 = token) defaults to ``ids != pad_id``."""
        if mask is None:
            mask = (ids != self.pad_id).long()
        return self.body(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != self.pad_id).long()
        h = self.hidden(ids, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class PretextLM(nn.Module):
    """Lower level: backbone + untied LM head; ``forward(inputs, targets)`` = mean next-token CE (nats)."""

    def __init__(self, backbone: TextBackbone, lm_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        ones = torch.ones_like(inputs)  # pretext windows are never padded
        logits = self.lm_head(self.backbone.hidden(inputs, ones))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def _untie(model: nn.Module) -> None:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        raise ValueError("the model has no LM head (get_output_embeddings() is None); pass a causal LM.")
    if out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr():
        out.weight = nn.Parameter(inp.weight.detach().clone())
    model.config.tie_word_embeddings = False


def build_gpt(vocab_size: int, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, seed: int = 0) -> nn.Module:
    """A GPT-2 ``GPT2LMHeadModel`` from a config, random init, untied LM head, no dropout.

    Example:
        >>> m = build_gpt(29, n_layer=1, n_embd=8, n_head=2, n_positions=16)
        >>> m.lm_head.weight is m.transformer.wte.weight, m.config.n_positions
        (False, 16)
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ValueError(f"`n_embd` ({n_embd}) must be divisible by `n_head` ({n_head}).")
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    _untie(model)
    _no_dropout(model)
    return model


def load_causal_lm(path: str) -> nn.Module:
    """Load a causal LM from the local folder ``path`` (``--model-path``), untie its LM head, drop dropout.

    Raises:
        FileNotFoundError: ``path`` is not a folder with a model config.
        ValueError: the checkpoint is not a causal LM with an LM head (e.g. a bare ``GPT2Model``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(
            f"--model-path {path!r} is not a local folder; pass a folder written by `save_pretrained` "
            "(nothing is downloaded)."
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--model-path {path!r} holds no model config: {str(err)[:200]}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs):
        raise ValueError(
            f"--model-path {path!r} holds a model without an LM head (architectures {archs}); BiSSL's "
            "pretext task needs a causal LM (e.g. GPT2LMHeadModel, *ForCausalLM)."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except ValueError as err:
        raise ValueError(f"--model-path {path!r} is not a causal language model: {str(err)[:200]}") from None
    _untie(model)
    _no_dropout(model)
    return model


def split_lm(model: nn.Module, pad_id: int) -> PretextLM:
    """The :class:`PretextLM` view of a causal LM (shares its parameters)."""
    body = model.base_model
    if body is model:
        raise ValueError("the causal LM has no separate base model (model.base_model is the model itself).")
    return PretextLM(TextBackbone(body, pad_id), model.get_output_embeddings())


def context_length(model: nn.Module) -> int | None:
    """The model's maximal sequence length (``n_positions`` / ``max_position_embeddings``), if it has one."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(model.config, key, None)
        if isinstance(v, int):
            return v
    return None


def check_vocab(tokenizer: Any, model: nn.Module) -> None:
    """Refuse a tokenizer with ids beyond the model's embedding table.

    Raises:
        ValueError: naming ``--tokenizer-path`` / ``--model-path``.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"tokenizer/model vocabulary mismatch: the tokenizer (--tokenizer-path) has {tokenizer.vocab_size} "
            f"tokens but the model (--model-path) embeds only {rows}; use the tokenizer the model was trained with."
        )
    if tokenizer.pad_id >= rows:
        raise ValueError(f"--tokenizer-path: pad id {tokenizer.pad_id} is outside the model's {rows} embeddings.")


def check_context(seq_len: int, model: nn.Module) -> None:
    """Refuse ``seq_len`` (``--seq-len``) longer than the model's context (pretext windows use ``seq_len``).

    Example:
        >>> check_context(64, build_gpt(29, n_layer=1, n_embd=8, n_head=2, n_positions=32))
        Traceback (most recent call last):
        ...
        ValueError: --seq-len 64 is longer than the model's context of 32 positions; pass --seq-len <= 32.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"--seq-len must be an integer >= 2, got {seq_len!r}.")
    n = context_length(model)
    if n is not None and seq_len > n:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the model's context of {n} positions; pass --seq-len <= {n}."
        )


_LORA_TARGETS = {"gpt2": (["c_attn", "c_proj", "c_fc"], True)}


def add_lora(
    backbone: TextBackbone, rank: int, alpha: float | None = None, *, seed: int = 0, init: bool = True
) -> None:
    """Insert LoRA adapters of rank ``rank`` (``--lora-rank``) into ``backbone`` and freeze the rest.

    Args:
        backbone: the :class:`TextBackbone` (changed in place).
        rank: adapter rank :math:`r \\ge 1`.
        alpha: LoRA scaling numerator (default :math:`2r`).
        seed: seed of the adapter initialisation.
        init: ``True``: peft's default (B = 0, the adapted model equals the base model); ``False``:
            random A and B (tests).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be an integer >= 1, got {rank!r}.")
    targets, fan_in_fan_out = _LORA_TARGETS.get(getattr(backbone.body.config, "model_type", ""), ("all-linear", False))
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=init,
    )
    torch.manual_seed(seed)
    inject_adapter_in_model(cfg, backbone.body)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in backbone.parameters()):
        raise ValueError("--lora-rank: no LoRA adapter was inserted (no matching linear layers).")
