"""Bad input to the text path: each a clear error naming the argument."""

from __future__ import annotations

import dataclasses

import pytest

from applications.bissl.cli import main
from applications.bissl.text.config import get_text_preset
from applications.bissl.text.corpora import load_task
from applications.bissl.text.model import build_gpt
from applications.bissl.text.setup import load_lm
from applications.bissl.text.tokenizer import CharTokenizer, encode_batch


def _cfg(**model):
    cfg = get_text_preset("tiny")
    cfg.model = dataclasses.replace(cfg.model, **model)
    return cfg


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model-path"):
        load_lm(_cfg(model_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--model-path .* no model config"):
        load_lm(_cfg(model_path=str(tmp_path / "empty")))


def test_model_without_lm_head(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(vocab_size=29, n_positions=32, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"--model-path .* without an LM head .*GPT2Model"):
        load_lm(_cfg(model_path=str(tmp_path)))


def test_tokenizer_model_vocab_mismatch(tmp_path):
    build_gpt(10, n_layer=1, n_embd=8, n_head=2, n_positions=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*--tokenizer-path.*29 tokens.*only 10"):
        load_lm(_cfg(model_path=str(tmp_path)))  # the default character tokenizer has 29 tokens


def test_sequence_longer_than_context(tmp_path):
    build_gpt(29, n_layer=1, n_embd=8, n_head=2, n_positions=16).save_pretrained(tmp_path)
    CharTokenizer().save(str(tmp_path))
    with pytest.raises(ValueError, match=r"--seq-len 32 is longer than the model's context of 16"):
        load_lm(_cfg(model_path=str(tmp_path), seq_len=32))
    _, lm, tok = load_lm(_cfg(model_path=str(tmp_path), seq_len=16))  # fits: accepted
    assert tok.vocab_size == 29 and lm.backbone.out_dim == 8


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_empty_document(tmp_path):
    _write(tmp_path / "t", "train.csv", "text,label\ngood day,a\n1234 !!,b\n")
    _write(tmp_path / "t", "test.csv", "text,label\nfine,a\n")
    with pytest.raises(ValueError, match=r"document 1 .* empty"):
        load_task("file:t", tmp_path)
    with pytest.raises(ValueError, match="empty"):
        encode_batch(CharTokenizer(), ["ok", ""], 8)


def test_missing_label_column(tmp_path):
    _write(tmp_path / "t", "train.jsonl", '{"text": "a b", "y": 0}\n{"text": "c", "y": 1}\n')
    _write(tmp_path / "t", "test.jsonl", '{"text": "a", "y": 0}\n')
    with pytest.raises(ValueError, match=r"no column 'label' .*--label-column"):
        load_task("file:t", tmp_path)
    assert load_task("file:t", tmp_path, label_column="y").num_classes == 2


def test_unknown_task_and_modality(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown text task 'mnist'"):
        load_task("mnist", tmp_path)
    with pytest.raises(SystemExit, match="--modality must be one of"):
        main(["run", "--modality", "video"])
    with pytest.raises(SystemExit):
        main(["run", "--modality", "text", "--preset", "demo"])
    assert "--preset: invalid choice: 'demo'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset 'demo' has no text version"):
        get_text_preset("demo")
