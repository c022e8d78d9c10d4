r"""Configuration of text BiSSL: the model and pretraining sections, reused BiSSL / fine-tuning sections, presets.

The BiSSL stage and the fine-tuning protocol reuse the image path's
:class:`~applications.bissl.config.BiSSLConfig` and :class:`~applications.bissl.config.FinetuneConfig`
(same fields, same meaning). Differences of the text path, all visible here: the lower level and
pretraining use AdamW (LARS is a large-batch ResNet optimiser; ``lower_lr`` / ``lower_wd`` are
AdamW's), the upper level and fine-tuning keep the authors' SGD (momentum 0.9, cosine), and the
batch sizes count sequences of ``seq_len`` tokens. The head warm-up is the ``head_warmup_mode="eval"``
variant (features of the frozen backbone, computed once: text has no augmentation), and the stage keeps
the paper's constant ``lam`` / ``damping`` (:func:`~applications.bissl.text.stage.check_text_bissl`
refuses the image path's adaptive modes). ``upper_split="train"`` keeps fine-tuning's validation
documents out of the stage, as in the image path.

Presets:

* ``tiny``: seconds; tests and CI (``python -m applications.bissl run --modality text --preset tiny``).
* ``cpu``: a 2-layer GPT (d = 64) on 128-character windows, two downstream tasks (Reuters R8 and the
  election tweets), sized to finish in about a quarter of an hour on 2 CPU cores.
* ``gpu``: GPT-2 small (12 layers, d = 768, 12 heads), the authors' BiSSL settings (500
  alternations of 20 lower and 8 upper steps, lam 1e-3, damping 10, gamma 1, CG 5 steps, 20 head
  warm-up epochs, fine-tuning with 100 HPO trials and 10 seeds); for users with a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from hypergrad import CG

from ..config import BiSSLConfig, FinetuneConfig, method_dict, paper_method

__all__ = ["TextModelConfig", "TextPretrainConfig", "TextConfig", "TEXT_PRESETS", "get_text_preset"]


def _check_int(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: `{name}` must be an integer >= {low}, got {value!r}.")


@dataclass
class TextModelConfig:
    """The causal LM.

    Args:
        model_path: local folder of a Hugging Face causal LM (``--model-path``); ``None`` builds a
            GPT-2 from ``n_layer`` / ``n_embd`` / ``n_head`` with random initialisation.
        tokenizer_path: local tokenizer folder (``--tokenizer-path``); ``None``: the model folder's
            tokenizer if it has one, else the character tokenizer.
        n_layer, n_embd, n_head: GPT-2 size when built from a config.
        seq_len: tokens per sequence (pretext windows and downstream documents; ``--seq-len``).
        lora_rank: ``0`` full-parameter BiSSL; ``r > 0`` LoRA adapters of rank r (``--lora-rank``).
        lora_alpha: LoRA scaling numerator (``None``: 2r).
    """

    model_path: str | None = None
    tokenizer_path: str | None = None
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    seq_len: int = 128
    lora_rank: int = 0
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head"):
            _check_int("TextModelConfig", name, getattr(self, name), 1)
        _check_int("TextModelConfig", "seq_len", self.seq_len, 2)
        _check_int("TextModelConfig", "lora_rank", self.lora_rank, 0)


@dataclass
class TextPretrainConfig:
    """Next-token pretraining on the Shakespeare corpus (AdamW, linear warm-up then cosine).

    Args:
        steps: optimiser steps; batch_size: windows of ``seq_len + 1`` characters per step.
        lr, weight_decay, warmup_steps: AdamW settings.
        max_chars: use the first ``max_chars`` characters of the corpus (``None``: all 4.7 M).
        eval_chars: the held-out tail of the corpus on which bits per character are measured.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_chars: int | None = None
    eval_chars: int = 20000

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_chars"):
            _check_int("TextPretrainConfig", name, getattr(self, name), 1)
        _check_int("TextPretrainConfig", "warmup_steps", self.warmup_steps, 0)


@dataclass
class TextConfig:
    """The whole text pipeline (one preset plus overrides)."""

    name: str = "cpu"
    model: TextModelConfig = field(default_factory=TextModelConfig)
    pretrain: TextPretrainConfig = field(default_factory=TextPretrainConfig)
    bissl: BiSSLConfig = field(default_factory=lambda: BiSSLConfig(head_warmup_mode="eval"))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    downstream: tuple[str, ...] = ("reuters_r8", "election_tweets")
    data_root: str = "data"
    out_dir: str = "results"
    log_dir: str | None = None
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    text_column: str = "text"
    label_column: str = "label"

    @property
    def run_dir(self) -> str:
        """``out_dir/text-<preset>`` (apart from the image presets' folders)."""
        return os.path.join(self.out_dir, f"text-{self.name}")

    @property
    def variant_dir(self) -> str:
        """Where the BiSSL stage, fine-tuning and results go: ``run_dir``, or ``run_dir/lora<r>`` with LoRA
        (the pretrained model in ``run_dir/pretrain`` is shared by both)."""
        r = self.model.lora_rank
        return os.path.join(self.run_dir, f"lora{r}") if r else self.run_dir

    @property
    def logs(self) -> str:
        return self.log_dir or os.path.join(self.variant_dir, "logs")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bissl"]["method"] = method_dict(self.bissl.method)
        return d


def _tiny() -> TextConfig:
    return TextConfig(
        name="tiny",
        model=TextModelConfig(n_layer=1, n_embd=16, n_head=2, seq_len=32),
        pretrain=TextPretrainConfig(steps=15, batch_size=8, warmup_steps=2, max_chars=200_000, eval_chars=2000),
        bissl=BiSSLConfig(
            head_warmup_mode="eval",
            alternations=2,
            lower_steps=2,
            upper_steps=2,
            head_warmup_epochs=1,
            lower_lr=1e-3,
            lower_wd=0.01,
            lower_warmup_steps=1,
            upper_lr=0.05,
            upper_wd=1e-4,
            pretext_batch=8,
            downstream_batch=16,
            method=paper_method(solver=CG(max_steps=2), reuse_operator=True),
        ),
        finetune=FinetuneConfig(epochs=1, batch_size=16, hpo_trials=2, num_runs=2, val_fraction=0.25),
        downstream=("reuters_r8", "election_tweets"),
        threads=1,
        max_train_samples=64,
        max_test_samples=64,
    )


def _cpu() -> TextConfig:
    return TextConfig(
        name="cpu",
        model=TextModelConfig(n_layer=2, n_embd=64, n_head=4, seq_len=64),
        pretrain=TextPretrainConfig(steps=400, batch_size=32, lr=3e-3, warmup_steps=20, eval_chars=20000),
        bissl=BiSSLConfig(
            head_warmup_mode="eval",
            alternations=8,
            lower_steps=8,
            upper_steps=4,
            method=paper_method(solver=CG(max_steps=3), reuse_operator=True),
            head_warmup_epochs=5,
            lower_lr=1e-3,
            lower_wd=0.01,
            lower_warmup_steps=8,
            upper_lr=0.05,
            upper_wd=1e-4,
            pretext_batch=32,
            downstream_batch=32,
        ),
        finetune=FinetuneConfig(epochs=2, batch_size=32, hpo_trials=3, num_runs=3, val_fraction=0.2),
        downstream=("reuters_r8", "election_tweets"),
        threads=1,
        max_train_samples=400,
        max_test_samples=500,
    )


def _gpu() -> TextConfig:
    return TextConfig(
        name="gpu",
        model=TextModelConfig(n_layer=12, n_embd=768, n_head=12, seq_len=256),
        pretrain=TextPretrainConfig(steps=20000, batch_size=64, lr=6e-4, weight_decay=0.1, warmup_steps=1000),
        bissl=BiSSLConfig(
            head_warmup_mode="eval",
            alternations=500,
            lower_steps=20,
            upper_steps=8,
            gamma=1.0,
            method=paper_method(lam=1e-3, damping=10.0, solver=CG(max_steps=5)),
            head_warmup_epochs=20,
            lower_lr=6e-4,
            lower_wd=0.1,
            lower_warmup_steps=200,
            upper_lr=0.03,
            upper_wd=1e-3,
            pretext_batch=64,
            downstream_batch=64,
        ),
        finetune=FinetuneConfig(epochs=20, batch_size=64, hpo_trials=100, num_runs=10),
        downstream=("reuters_r8", "reuters_r52", "newsgroups", "election_tweets"),
        device="cuda",
    )


TEXT_PRESETS = {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}


def get_text_preset(name: str) -> TextConfig:
    """A fresh copy of the text preset ``name`` (``tiny``, ``cpu`` or ``gpu``).

    Example:
        >>> get_text_preset("tiny").model.n_layer
        1
    """
    if name not in TEXT_PRESETS:
        raise ValueError(f"--preset {name!r} has no text version; text presets: {sorted(TEXT_PRESETS)}.")
    return TEXT_PRESETS[name]()
