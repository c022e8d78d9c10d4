r"""One run scaffold for every stage: output folder, resume file, metrics, progress, rank-0 saves, barriers.

``pretrain``, the BiSSL stage, fine-tuning (and the text stages) differ in what they train; they
share how a run is hosted. :class:`StageRun` is that part:

* the output folder and the resume file ``<out_dir>/checkpoint.pt`` (:attr:`~StageRun.resumable`
  says whether to continue from it; each stage reads and checks it itself);
* one :class:`hypergrad.MetricsLogger` (CSV / JSONL, optionally TensorBoard) and tqdm bars, on the
  main process only;
* saves (``hypergrad.save_checkpoint`` or JSON) written by the main process, followed by a barrier
  so that no rank runs ahead of a file it may read;
* :meth:`~StageRun.close` (or leaving a ``with`` block) closes the bars and the logger.

Under ``torchrun`` every rank builds the same ``StageRun``; ``synchronized=False`` is for a stage
that only the main process runs (fine-tuning), where a barrier would wait for ranks that never come.
Nothing here draws random numbers, so hosting a stage in a ``StageRun`` never changes its results.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from tqdm.auto import tqdm

from hypergrad import MetricsLogger, save_checkpoint

from . import distributed as dist_utils

__all__ = ["StageRun"]


class StageRun:
    """The scaffold of one stage run (see the module docstring).

    Args:
        out_dir: the stage's output folder (created by the main process).
        log_dir: where the metrics go (``None``: no logger).
        tensorboard: also write TensorBoard events.
        resume: continue from ``<out_dir>/checkpoint.pt`` when it exists.
        progress: show progress bars (main process only).
        synchronized: every rank runs the stage (saves end with a barrier); ``False`` when only
            the main process does.

    Example:
        >>> import tempfile
        >>> with StageRun(tempfile.mkdtemp(), progress=False) as run:
        ...     run.resumable
        ...     path = run.save({"step": 1})
        ...     run.resumable
        False
        True
    """

    def __init__(
        self,
        out_dir: str,
        *,
        log_dir: str | None = None,
        tensorboard: bool = False,
        resume: bool = True,
        progress: bool = True,
        synchronized: bool = True,
    ) -> None:
        self.out_dir = out_dir
        self.main = dist_utils.is_main_process()
        self.resume = resume
        self.synchronized = synchronized
        self.checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
        self._progress = progress and self.main
        self._bars: list[Any] = []
        if self.main:
            os.makedirs(out_dir, exist_ok=True)
        self.logger = MetricsLogger(log_dir, tensorboard=tensorboard) if self.main and log_dir else None

    @property
    def resumable(self) -> bool:
        """Whether the run continues from :attr:`checkpoint_path` (``resume`` and the file exists)."""
        return self.resume and os.path.exists(self.checkpoint_path)

    def path(self, name: str) -> str:
        """``<out_dir>/<name>``."""
        return os.path.join(self.out_dir, name)

    def bar(self, iterable: Iterable | None = None, **kwargs: Any) -> Any:
        """A tqdm bar (``tqdm(iterable, **kwargs)``), hidden off the main process or without ``progress``."""
        bar = tqdm(iterable, disable=not self._progress, **kwargs)
        self._bars.append(bar)
        return bar

    def log(self, step: int, row: dict[str, Any]) -> None:
        """One metrics row (main process only)."""
        if self.logger is not None:
            self.logger.log(step, row)

    def barrier(self) -> None:
        """Wait for every rank (no-op for an unsynchronized run or without a process group)."""
        if self.synchronized:
            dist_utils.barrier()

    def save(self, state: Any, name: str = "checkpoint.pt", **kwargs: Any) -> str:
        """``hypergrad.save_checkpoint(state, <out_dir>/<name>, **kwargs)`` on the main process, then a barrier.

        Args:
            state: what to save, or a function without arguments that returns it (called on the
                main process only: other ranks never build the state).
            name: the file name in ``out_dir``.
            kwargs: passed to ``hypergrad.save_checkpoint`` (e.g. ``kind=``).

        Returns:
            The file's path (on every rank).
        """
        path = self.path(name)
        if self.main:
            save_checkpoint(state() if callable(state) else state, path, **kwargs)
        self.barrier()
        return path

    def write_json(self, name: str, obj: Any) -> str:
        """Write ``obj`` to ``<out_dir>/<name>`` atomically (main process only); return the path."""
        path = self.path(name)
        if self.main:
            with open(path + ".tmp", "w") as f:
                json.dump(obj, f, indent=1)
            os.replace(path + ".tmp", path)
        return path

    def read_json(self, name: str) -> Any:
        """The JSON object in ``<out_dir>/<name>`` when resuming and the file exists, else ``None``."""
        path = self.path(name)
        if not (self.resume and os.path.exists(path)):
            return None
        with open(path) as f:
            return json.load(f)

    def close(self) -> None:
        """Close the bars and the logger (idempotent)."""
        for bar in self._bars:
            bar.close()
        self._bars = []
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
