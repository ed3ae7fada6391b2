"""Atomic file writes: every file sap_fast writes (stats, corrected weights, reports) goes through
:func:`atomic_write`, so a crash, a full disk or Ctrl-C never leaves a half-written file behind,
and an existing file at the destination stays exactly as it was unless the new one is complete.

How: a temporary file in the destination's folder (``mkstemp``, prefix ``.sap_fast-``), written,
flushed and ``fsync``-ed, then ``os.replace``-d over the destination (atomic on POSIX and on
Windows for one volume), then the folder is ``fsync``-ed so the rename itself survives a power
cut (best effort: skipped where folders cannot be opened, e.g. Windows).

The new file gets the permissions an ordinary ``open(path, "w")`` would give (``0o666`` less the
umask), or the old file's permissions when it replaces one (``mkstemp`` alone would leave 0600).

The destination folder must exist: a missing one raises :class:`FileNotFoundError` naming it
(callers that own an output folder create it themselves).
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import stat
import sys
import tempfile
from typing import Any, BinaryIO, Callable, Mapping, Optional

__all__ = ["atomic_write", "write_beside", "discard", "exchange_folders", "fsync_folder", "save_json", "save_torch", "save_safetensors", "save_figure", "to_jsonable"]

def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    classic set-and-restore (a tiny window in which another thread would see umask 0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_folder(folder: str) -> None:
    """Make the rename durable; best effort (not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a binary temporary file next to it, which then
    replaces ``path`` in one step.

    On any exception, ``KeyboardInterrupt`` included (raised by ``write``, by the flush/fsync or by
    the rename), the temporary file is removed and the exception re-raised; a file already at
    ``path`` is left untouched. ``write`` must not close ``f``.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist (it is not created).
    """
    tmp = write_beside(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(os.fspath(path))))


def write_beside(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
    """The first half of :func:`atomic_write`: ``write(f)`` fills a temporary file in the folder
    of ``path`` (flushed, ``fsync``-ed, with the permissions ``path`` will have), whose name is
    returned; ``os.replace(tmp, path)`` later puts it in place in one step (:func:`discard`
    removes it instead). On any exception the temporary file is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist "
                                "(create it first)")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)   # replacing a file: keep its permissions
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=".sap_fast-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = -1  # owned by f from here on
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, mode)
        except OSError:  # e.g. a filesystem without permissions: the content is what matters
            pass
    except BaseException:
        if fd != -1:
            os.close(fd)
        discard(tmp)
        raise
    return tmp


def discard(path: str) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_folder(folder: str) -> None:
    """Make the renames in ``folder`` durable (best effort: not every platform opens folders)."""
    _fsync_folder(folder)


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_folders(a: str, b: str) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``): at every moment each name holds one of the two whole folders. Returns
    False, having changed nothing, where the platform or filesystem cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.2)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100  # AT_FDCWD
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # the filesystem (or a sandbox) does not offer the exchange
    raise OSError(err, f"cannot swap {a!r} and {b!r}: {os.strerror(err)}")


# -- JSON ------------------------------------------------------------------------------------------
def _json_key(key: Any, where: str) -> str:
    key = _scalar(key)
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(to_jsonable(key, where))  # None → "null", True → "true", 1.5 → "1.5"
    raise TypeError(f"{where}: dict key of type {type(key).__name__} cannot be a JSON key")


def _scalar(obj: Any) -> Any:
    """Unwrap 0-d tensors and numpy scalars into Python numbers (anything else unchanged)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor) and obj.dim() == 0:
        return obj.item()
    np = sys.modules.get("numpy")  # not imported: obj cannot be a numpy object
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    return obj


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """``obj`` as plain JSON types.

    Conversions: tensors and numpy arrays → (nested) lists, 0-d tensors and numpy scalars →
    Python numbers, **non-finite floats (nan, inf, -inf) → None** (JSON has no such values;
    ``null`` reads as "no number"), tuples/sets → lists, dict keys → strings (numbers and None as
    JSON writes them: ``1.5`` → ``"1.5"``, None → ``"null"``), dataclasses → dicts of their fields,
    ``torch.dtype``/``torch.device``/paths → strings. Anything else raises ``TypeError`` naming
    where it was found (no silent ``str()``).
    """
    obj = _scalar(obj)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_json_key(k, where): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().tolist(), where)
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    import dataclasses
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(obj)}
    raise TypeError(f"{where}: cannot write a {type(obj).__name__} to JSON "
                    "(convert it to numbers, strings, lists or dicts first)")


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 2, non-ASCII kept as is, trailing newline), atomically.
    Values are converted by :func:`to_jsonable`: tensors → lists, nan/inf → null."""
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


# -- tensors ---------------------------------------------------------------------------------------
def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a name → tensor dict as a ``.safetensors`` file, atomically.

    The file is built in memory (``safetensors.torch.save``), then written. As safetensors
    requires, tensors must not share memory (clone tied weights) and ``metadata`` maps strings to
    strings. Needs the ``safetensors`` package (imported only here).
    """
    try:
        from safetensors.torch import save
    except ImportError as e:
        raise ImportError("save_safetensors needs the safetensors package: pip install safetensors") from e
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad[:5]}")
        metadata = dict(metadata)
    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


# -- figures ---------------------------------------------------------------------------------------
def save_figure(path: str | os.PathLike, fig, dpi: int = 120) -> None:
    """Render a matplotlib figure in memory (format from the file extension, PNG when there is
    none) at ``dpi``, then write it atomically."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    buf = io.BytesIO()
    fig.savefig(buf, format=ext or "png", dpi=dpi)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
