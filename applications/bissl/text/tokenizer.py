r"""Tokenizers that need no download: a character-level one, or any tokenizer saved in a local folder.

The offline default is :class:`CharTokenizer` over the normalised alphabet (``a``-``z`` and the
space, see :func:`~applications.bissl.text.corpora.normalize`) plus ``<pad>`` and ``<unk>``; its
next-token loss in nats divided by :math:`\ln 2` is bits per character. ``--tokenizer-path`` (or a
tokenizer saved inside ``--model-path``) loads a Hugging Face tokenizer from a local folder instead.
"""

from __future__ import annotations

import json
import os
import string
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["Tokenizer", "CharTokenizer", "HFTokenizer", "load_tokenizer", "encode_batch"]


class Tokenizer(Protocol):
    """What the text pipeline needs from a tokenizer."""

    vocab_size: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def save(self, folder: str) -> None: ...


class CharTokenizer:
    """One id per character; ``<pad>`` = 0, ``<unk>`` = 1, then the alphabet.

    Args:
        alphabet: the characters, in id order (default: space and ``a``-``z``).

    Example:
        >>> tok = CharTokenizer()
        >>> tok.encode("ab z!"), tok.vocab_size, tok.decode(tok.encode("to be"))
        ([3, 4, 2, 28, 1], 29, 'to be')
    """

    FILE = "char_tokenizer.json"

    def __init__(self, alphabet: str = " " + string.ascii_lowercase):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"`alphabet` must be a non-empty string of distinct characters, got {alphabet!r}.")
        self.alphabet = alphabet
        self.pad_id, self.unk_id = 0, 1
        self._ids = {c: i + 2 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 2

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i - 2] if i >= 2 else "" for i in ids)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, self.FILE), "w") as f:
            json.dump({"type": "char", "alphabet": self.alphabet}, f)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (``AutoTokenizer``, no download)."""

    def __init__(self, tok: Any):
        self.tok = tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError(
                "--tokenizer-path: the tokenizer has neither a pad nor an eos token; add a pad token to it."
            )
        self.pad_id = int(pad)
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def save(self, folder: str) -> None:
        self.tok.save_pretrained(folder)


def load_tokenizer(path: str | None) -> Tokenizer:
    """``None``: the default :class:`CharTokenizer`; a folder: its ``char_tokenizer.json`` or HF tokenizer.

    Raises:
        FileNotFoundError: ``path`` is not a folder, or holds no tokenizer (names ``--tokenizer-path``).
    """
    if path is None:
        return CharTokenizer()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--tokenizer-path {path!r} is not a folder; pass a local tokenizer folder.")
    char_file = os.path.join(path, CharTokenizer.FILE)
    if os.path.exists(char_file):
        with open(char_file) as f:
            return CharTokenizer(json.load(f)["alphabet"])
    try:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"--tokenizer-path {path!r} holds no tokenizer ({CharTokenizer.FILE} or a Hugging Face "
            f"tokenizer): {str(err)[:200]}"
        ) from None


def encode_batch(tok: Tokenizer, texts: Sequence[str], seq_len: int) -> Tensor:
    """``[len(texts), seq_len]`` ids: each text's first ``seq_len`` tokens, right-padded with ``pad_id``.

    Raises:
        ValueError: a text encodes to no token at all (an empty document).

    Example:
        >>> encode_batch(CharTokenizer(), ["ab", "abcd"], 3)
        tensor([[3, 4, 0],
                [3, 4, 5]])
    """
    out = torch.full((len(texts), seq_len), tok.pad_id, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = tok.encode(t)[:seq_len]
        if not ids:
            raise ValueError(f"document {i} is empty (no tokens: {t[:40]!r}); remove empty documents.")
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
