r"""Atomic, verified checkpoints: a run killed at any moment leaves the previous checkpoint readable,
and a file damaged on disk is refused instead of loaded.

:func:`save_checkpoint` writes to a temporary file in the destination's directory, flushes and
``fsync``\ s it, then renames it over the destination with :func:`os.replace` (atomic on POSIX and
Windows when both paths are on one file system) and finally ``fsync``\ s the directory so the rename
itself survives a power loss. A reader therefore sees either the old checkpoint or the new one,
never a half-written file. A kill between the write and the rename can leave a stray
``.<name>.*.tmp`` file next to the checkpoint; it is never read and can be deleted. The file is
created with mode ``0o666`` minus the process umask, like any file the user writes.

Integrity: the file is an ordinary :func:`torch.save` archive of ``state`` plus one extra top-level
entry, ``"__hypergrad_checkpoint__"``, holding the format version (:data:`FORMAT_VERSION`), an
optional ``kind`` tag (which stage or tool wrote it) and a SHA-256 digest of every tensor (dtype,
shape and bytes) and of the non-tensor structure (keys, types and plain values).
:func:`load_checkpoint` recomputes them and raises :class:`CheckpointError` on any difference, so a
flipped bit inside a tensor is detected, names the tensor, and is never loaded. Empty, truncated and
foreign files get a :class:`CheckpointError` that says which of these it is.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import secrets
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "CheckpointError",
    "FORMAT_VERSION",
]

#: Version of the on-disk format written by :func:`save_checkpoint`. 1: a bare ``torch.save`` dict
#: (hypergrad <= 0.1.0, no integrity record); 2: with the integrity record.
FORMAT_VERSION = 2

_RECORD_KEY = "__hypergrad_checkpoint__"
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: empty, truncated, foreign, corrupted or of the wrong kind.

    A :class:`ValueError`, so command-line tools can report it as a user error. The message says what
    is wrong with the file and what to do; :attr:`path` is the file.

    Args:
        message: what went wrong and the fix.
        path: the checkpoint file.

    Example:
        >>> import os, tempfile, hypergrad
        >>> p = os.path.join(tempfile.mkdtemp(), "empty.pt")
        >>> open(p, "wb").close()
        >>> try:
        ...     hypergrad.load_checkpoint(p)
        ... except hypergrad.CheckpointError as err:
        ...     print(str(err).split(";")[0])
        checkpoint '...empty.pt' is empty (0 bytes)
    """

    def __init__(self, message: str, path: str | os.PathLike[str]):
        super().__init__(message)
        self.path = Path(path)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str], *, kind: str | None = None) -> Path:
    """Write ``state`` to ``path`` atomically, with a checksum of every tensor (see the module docs).

    Args:
        state: a dict of tensors and plain types (nested dicts, lists, numbers, strings); typically
            ``problem.state_dict()`` plus your own entries (epoch, config). Such a dict loads with
            ``weights_only=True``. It must not contain the key ``"__hypergrad_checkpoint__"``.
        path: destination file; its directory is created if missing.
        kind: an optional tag saying what the file is (e.g. ``"pretrain"``, ``"bissl-checkpoint"``);
            :func:`load_checkpoint` with ``expected_kind`` refuses a file of another kind.

    Returns:
        The destination as a :class:`pathlib.Path`.

    Raises:
        TypeError: ``state`` is not a dict (or holds an object that cannot be pickled), ``path`` not a
            path, ``kind`` not a string.
        ValueError: ``path`` is a directory, ``kind`` is empty, ``state`` has the reserved key.
        OSError: the disk (or quota) is full (errno ``ENOSPC``; the previous checkpoint is kept and no
            temporary file is left), or another I/O error.

    Example:
        >>> import tempfile, os, torch, hypergrad
        >>> d = tempfile.mkdtemp()
        >>> p = hypergrad.save_checkpoint({"step": 3, "w": torch.ones(2)}, os.path.join(d, "ckpt.pt"), kind="demo")
        >>> hypergrad.load_checkpoint(p, expected_kind="demo")["step"]
        3
    """
    if not isinstance(state, dict):
        raise TypeError(f"`state` must be a dict (e.g. problem.state_dict()), got {type(state).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    if kind is not None and not isinstance(kind, str):
        raise TypeError(f"`kind` must be None or a str such as 'pretrain', got {type(kind).__name__}.")
    if kind is not None and not kind.strip():
        raise ValueError("`kind` must be None or a non-empty str such as 'pretrain', got ''.")
    if _RECORD_KEY in state:
        raise ValueError(
            f"`state` has the reserved key {_RECORD_KEY!r} (did you pass a torch.load-ed checkpoint?); "
            "load it with hypergrad.load_checkpoint, which removes it, or delete that key."
        )
    dest = Path(path)
    if dest.is_dir():
        raise ValueError(f"`path` {str(dest)!r} is a directory; pass a file name such as {str(dest / 'last.pt')!r}.")
    record = {"format": FORMAT_VERSION, "kind": kind, "torch": str(torch.__version__), **_digests(state)}
    payload = {**state, _RECORD_KEY: record}
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(dest)
    except OSError as err:
        _raise_if_disk_full(err, dest)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _raise_if_disk_full(err, dest)
        if isinstance(err, (pickle.PicklingError, AttributeError, TypeError)) and "pickle" in str(err).lower():
            raise TypeError(
                f"`state` holds an object that cannot be saved ({_first_line(err)}); keep tensors and plain types "
                "(numbers, strings, lists, dicts) in it, e.g. problem.state_dict() and your epoch or config. "
                "Nothing was written."
            ) from err
        raise
    _fsync_dir(dest.parent)
    return dest


def _create_temp(dest: Path) -> tuple[int, str]:
    """A new temporary file next to ``dest``, mode 0o666 minus the umask (``mkstemp`` would force 0o600)."""
    for _ in range(100):
        tmp = str(dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    raise FileExistsError(f"could not create a temporary file next to {str(dest)!r}")  # pragma: no cover


def _raise_if_disk_full(err: BaseException, dest: Path) -> None:
    """Re-raise a full disk (also when torch's writer wrapped it in a RuntimeError) as a clear OSError."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            try:
                free = f"{os.statvfs(dest.parent).f_bavail * os.statvfs(dest.parent).f_frsize / 2**20:.1f} MiB free"
            except (OSError, AttributeError):  # pragma: no cover - no statvfs
                free = "free space unknown"
            raise OSError(
                cause.errno,
                f"no space left on device while writing checkpoint {str(dest)!r} ({free} in "
                f"{str(dest.parent)!r}). Nothing was written: the previous checkpoint, if any, is intact. "
                "Free some space or write to another directory (e.g. another --out-dir).",
            ) from err
        cause = cause.__cause__ or cause.__context__


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    *,
    weights_only: bool = True,
    expected_kind: str | None = None,
    unverified: Literal["warn", "allow", "raise"] = "warn",
) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Every tensor's SHA-256 (and one of the non-tensor structure) is recomputed and compared with
    the record written at save time, so a corrupted file is refused rather than loaded with changed
    values.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default ``"cpu"``; pass ``"cuda"`` or a device to load
            straight onto an accelerator).
        weights_only: restrict unpickling to tensors and plain types (safe for files you did not
            write). ``problem.state_dict()`` needs no more than that; pass ``False`` only for
            trusted files holding arbitrary objects.
        expected_kind: if given, the ``kind`` the file must have been saved with; a file of another
            kind (e.g. another stage's output) is refused.
        unverified: what to do with a dict saved without the integrity record (a plain
            :func:`torch.save` file, or one from hypergrad <= 0.1.0, format 1): ``"warn"`` loads it
            with a :class:`UserWarning`, ``"allow"`` loads it silently, ``"raise"`` refuses it.

    Returns:
        The saved dict (without the integrity record).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, not a checkpoint, corrupted (checksum
            mismatch), of another ``kind``, from a newer format, or unverified with ``unverified="raise"``.
        TypeError: the file holds something other than a dict; ``weights_only`` is not a bool or
            ``map_location`` not a device, dict or callable.
        ValueError: ``map_location`` names no device, a device this process lacks (CUDA, MPS, XPU, ...), or
            ``"meta"``.

    Example:
        >>> import tempfile, os, torch, hypergrad
        >>> p = os.path.join(tempfile.mkdtemp(), "c.pt")
        >>> _ = hypergrad.save_checkpoint({"w": torch.zeros(1)}, p)
        >>> hypergrad.load_checkpoint(p)["w"]
        tensor([0.])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    if expected_kind is not None and not isinstance(expected_kind, str):
        raise TypeError(f"`expected_kind` must be None or a str, got {type(expected_kind).__name__}.")
    if unverified not in ("warn", "allow", "raise"):
        raise ValueError(f"`unverified` must be one of ['warn', 'allow', 'raise'], got {unverified!r}.")
    if not isinstance(weights_only, bool):
        raise TypeError(f"`weights_only` must be True or False, got {weights_only!r}.")
    _check_map_location(map_location)
    src = Path(path)
    if src.is_dir():
        raise CheckpointError(f"checkpoint {str(src)!r} is a directory; pass the checkpoint file inside it.", src)
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at `path` {str(src)!r}; check the path (or start a fresh run).")
    try:
        with warnings.catch_warnings():  # torch's own note on foreign pickles; the error below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(src, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        raise CheckpointError(_explain_unreadable(src, err), src) from err
    if not isinstance(state, dict):
        raise TypeError(
            f"checkpoint {str(src)!r} holds a {type(state).__name__}, expected a dict; it was not written by "
            "hypergrad.save_checkpoint (a plain torch.save of something else?)."
        )
    record = state.pop(_RECORD_KEY, None)
    if record is None:
        if any(_looks_like_record(v) for v in state.values()):  # the record's own key was damaged
            raise CheckpointError(
                f"checkpoint {str(src)!r} is corrupted: its integrity record is stored under a damaged key. "
                "Delete it (or start afresh, e.g. --no-resume) and re-create it from a good copy.",
                src,
            )
        return _unverified(state, src, expected_kind, unverified)
    _verify(state, record, src, expected_kind)
    return state


def _check_map_location(map_location: Any) -> None:
    """What :func:`torch.load` accepts (else its error would read like a damaged file)."""
    if isinstance(map_location, torch.device):
        return _check_device(map_location)
    if map_location is None or isinstance(map_location, dict) or callable(map_location):
        return
    if not isinstance(map_location, str):
        raise TypeError(
            f"`map_location` must be None, a device string such as 'cpu' or 'cuda:0', a torch.device, a dict or "
            f"a callable, got {map_location!r} ({type(map_location).__name__})."
        )
    try:
        device = torch.device(map_location)
    except RuntimeError:
        raise ValueError(
            f"`map_location` {map_location!r} is not a device; pass e.g. 'cpu', 'cuda' or 'cuda:0'."
        ) from None
    _check_device(device)


def _check_device(device: torch.device) -> None:
    """A device the tensors can be loaded onto and verified on: not ``meta``; ``cpu`` or an existing device of its
    backend (CUDA, MPS, XPU, ...: ``torch.<type>.is_available()`` and the index below its ``device_count()``)."""
    if device.type == "meta":
        raise ValueError(
            "`map_location` 'meta' would load tensors without data, which cannot be verified against their "
            "checksums; load onto 'cpu' (or a GPU) and move the tensors afterwards."
        )
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    is_available = getattr(backend, "is_available", None)
    available = bool(is_available()) if callable(is_available) else False
    device_count = getattr(backend, "device_count", None)
    count = int(device_count()) if available and callable(device_count) else (1 if available else 0)
    if not available or (device.index or 0) >= count:
        kind = device.type.upper() if device.type in ("cuda", "xpu", "mps", "hpu", "mtia") else repr(device.type)
        raise ValueError(
            f"`map_location` {str(device)!r} names a {kind} device this process does not have "
            f"(torch.{device.type}.device_count() = {count}); pass map_location='cpu' or an existing "
            "device. The checkpoint file itself was not read."
        )


def _explain_unreadable(src: Path, err: Exception) -> str:
    size = src.stat().st_size
    with open(src, "rb") as f:
        head = f.read(4)
    where = f"checkpoint {str(src)!r}"
    fix = "Delete it (or start afresh, e.g. --no-resume) and re-create it, or pass the right file."
    if size == 0:
        return f"{where} is empty (0 bytes); the save that wrote it never finished. {fix}"
    if zipfile.is_zipfile(src):
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            reason = next((ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln), "")
            return (
                f"{where} holds Python objects that `weights_only=True` refuses to unpickle ({reason[:160]}). "
                "A checkpoint from "
                "hypergrad.save_checkpoint holds only tensors and plain types; if you wrote this file yourself "
                "and trust it, pass weights_only=False."
            )
        if "deserialize object on" in str(err):  # a map_location dict or callable naming a missing device
            return (
                f"{where} could not be placed on the device `map_location` asks for ({_first_line(err)[:160]}); "
                "the file itself may be fine: pass a map_location this process has, e.g. 'cpu'."
            )
        return f"{where} is a damaged torch archive ({type(err).__name__}: {_first_line(err)}). {fix}"
    if head.startswith(b"PK"):
        return f"{where} is truncated ({size} bytes; a copy or a save was interrupted). {fix}"
    if head[:1] == b"\x80":
        return (
            f"{where} is a bare pickle or a legacy-format torch file ({size} bytes), not a checkpoint written by "
            f"hypergrad.save_checkpoint. {fix}"
        )
    return f"{where} is not a checkpoint ({size} bytes starting with {head!r}). {fix}"


def _looks_like_record(value: Any) -> bool:
    return isinstance(value, dict) and len({"format", "kind", "tensors", "structure"} & set(value)) >= 2


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _unverified(state: dict[str, Any], src: Path, expected_kind: str | None, policy: str) -> dict[str, Any]:
    what = f"checkpoint {str(src)!r} has no integrity record (written by torch.save or by hypergrad <= 0.1.0, format 1)"
    if policy == "raise":
        kind = f" of kind {expected_kind!r}" if expected_kind is not None else ""
        raise CheckpointError(
            f"{what}, so it cannot be verified and is refused; expected a hypergrad.save_checkpoint file{kind}. "
            "Re-create it, or load it with unverified='allow' if you trust it.",
            src,
        )
    if policy == "warn":
        warnings.warn(
            f"{what}; loaded without checksum verification"
            + (f" or kind check (expected {expected_kind!r})" if expected_kind is not None else "")
            + ". Re-save it with hypergrad.save_checkpoint to protect it.",
            UserWarning,
            stacklevel=3,
        )
    return state


def _verify(state: dict[str, Any], record: Any, src: Path, expected_kind: str | None) -> None:
    where = f"checkpoint {str(src)!r}"
    fix = "Delete it (or start afresh, e.g. --no-resume) and re-create it from a good copy."
    if not isinstance(record, dict) or not isinstance(record.get("format"), int):
        raise CheckpointError(f"{where} has a damaged integrity record ({type(record).__name__}). {fix}", src)
    if record["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format {record['format']}, newer than this hypergrad reads ({FORMAT_VERSION}); "
            "upgrade hypergrad to load it.",
            src,
        )
    kind = record.get("kind")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(
            f"{where} holds a {kind!r} checkpoint, but a {expected_kind!r} one was expected: it was written by "
            "another stage or tool. Pass the right file, or start afresh (e.g. --no-resume).",
            src,
        )
    now = _digests(state)
    saved_tensors = record.get("tensors", {})
    if not isinstance(saved_tensors, dict):
        raise CheckpointError(f"{where} has a damaged integrity record. {fix}", src)
    changed = [p for p, h in now["tensors"].items() if saved_tensors.get(p) != h]
    if changed:
        names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise CheckpointError(
            f"{where} is corrupted: the SHA-256 of tensor {names} differs from the one written at save time "
            f"(a damaged disk, copy or transfer). Its values are not loaded. {fix}",
            src,
        )
    if now["structure"] != record.get("structure") or set(now["tensors"]) != set(saved_tensors):
        raise CheckpointError(
            f"{where} is corrupted: its keys or non-tensor values differ from the ones written at save time. {fix}",
            src,
        )


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _digests(state: dict[str, Any]) -> dict[str, Any]:
    """SHA-256 per tensor (dtype, shape, bytes) and one over the structure and plain values."""
    tensors: dict[str, str] = {}
    structure = hashlib.sha256()
    for path, leaf in _walk(state, ""):
        if isinstance(leaf, torch.Tensor):
            tensors[path] = _tensor_digest(leaf)
            structure.update(f"{path}:tensor;".encode())
        elif isinstance(leaf, _PLAIN):
            structure.update(f"{path}:{type(leaf).__name__}={leaf!r};".encode())
        else:  # arbitrary objects (weights_only=False): their repr may hold addresses, so only the type
            structure.update(f"{path}:{type(leaf).__name__};".encode())
    return {"tensors": tensors, "structure": structure.hexdigest()}


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        yield path, f"{type(node).__name__}[{len(node)}]"
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k!r}")
    elif isinstance(node, (list, tuple)):
        yield path, f"{type(node).__name__}[{len(node)}]"
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")
    else:
        yield path, node


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.device.type == "meta":
        return h.hexdigest()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    t = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; best effort (some platforms cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def get_rng_state() -> dict[str, Any]:
    """The state of every random generator a training loop touches, for a bit-exact resume.

    Covers torch (CPU and each CUDA device), Python's :mod:`random` and NumPy's global generator,
    stored as tensors and plain types so a checkpoint holding it loads with ``weights_only=True``.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "python": tuple, "numpy": dict}``;
        pass it to :func:`set_rng_state`.

    Example:
        >>> import torch, hypergrad
        >>> s = hypergrad.get_rng_state(); a = torch.rand(2)
        >>> hypergrad.set_rng_state(s); torch.equal(a, torch.rand(2))
        True
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every random generator from a :func:`get_rng_state` dict.

    CUDA states are restored for the devices present (a CPU-only machine skips them, a machine
    with fewer GPUs restores the first ones).

    Args:
        state: the dict returned by :func:`get_rng_state` (e.g. ``problem.state_dict()["rng"]``
            after :func:`load_checkpoint`).

    Example:
        >>> import random, hypergrad
        >>> state = hypergrad.get_rng_state(); a = random.random()
        >>> hypergrad.set_rng_state(state); random.random() == a
        True
    """
    if not isinstance(state, dict) or "torch" not in state:
        got = type(state).__name__ if not isinstance(state, dict) else f"a dict with keys {sorted(map(str, state))[:5]}"
        raise TypeError(f"`state` must be the dict returned by hypergrad.get_rng_state(), got {got}.")
    entry = "torch"
    try:  # every entry is tried on a scratch generator first: a malformed one sets nothing
        torch.Generator().set_state(state["torch"])
        entry = "python"
        py = state["python"]
        py_state = (py[0], tuple(py[1]), py[2])
        random.Random().setstate(py_state)
        entry = "numpy"
        n = state["numpy"]
        np_state = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        np.random.RandomState().set_state(np_state)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise TypeError(
            f"`state[{entry!r}]` is not a generator state from hypergrad.get_rng_state() "
            f"({type(err).__name__}: {_first_line(err)[:120]}); no generator was changed."
        ) from None
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    random.setstate(py_state)
    np.random.set_state(np_state)
