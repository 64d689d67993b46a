"""Atomic writing of files and of whole folders.

A file is written to a temp file in its destination folder, fsynced, then renamed over the destination: readers see
the old file or the new one, never half of one, and a failure leaves nothing behind.

A folder of files that belong together (an export; ``mq quantize``'s checkpoint with its exports) is built in a
hidden sibling staging folder (``.<name>.mq-stage-<host>-<pid>-<random>``) and swapped in with one rename, so the
folder at the destination is always one complete result: never a mix of two, never stale files of an earlier
write beside a new one. On Linux the swap is ``renameat2(RENAME_EXCHANGE)``, which has no window at all. Where that
is unavailable (other systems, some network file systems) the old folder is first renamed aside
(``.<name>.mq-old-...``) and the new one renamed into place: a kill between those two renames leaves no folder at
the destination (the previous result is in the ``mq-old`` folder), never a mixed one. Staging and ``mq-old``
folders left behind by killed processes are removed by the next write to the same destination once their process
is gone; a failing write removes only its own staging folder, never a folder some other process wrote.

Every ``OSError`` while writing (read-only folder, a path under a file, full disk) becomes one ``ExportError``
paragraph that names the path and says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mq_core.errors import ExportError

log = logging.getLogger(__name__)

#: Tags staging folders with the machine, so a process on another machine sharing the disk is never taken as dead.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
#: How often a swap is retried when another process puts its own result in place at the same moment.
_SWAP_ATTEMPTS = 5

_REASONS = {
    errno.EACCES: "you may not write there (the folder is read-only or belongs to someone else)",
    errno.EPERM: "you may not write there (the folder is read-only or belongs to someone else)",
    errno.EROFS: "it is on a read-only file system",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "your disk quota is used up",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EBUSY: "it is in use, or it is a mount point (write into a folder inside it instead)",
    errno.EXDEV: "it is a mount point (write into a folder inside it instead)",
}


def output_error(exc: OSError, path: str | os.PathLike[str]) -> ExportError:
    """The one-paragraph error for an ``OSError`` raised while writing ``path``."""
    detail = exc.strerror or str(exc)
    reason = _REASONS.get(exc.errno or 0, detail)
    return ExportError(
        f"cannot write {path}: {reason} ({detail}). Nothing was written there; choose another output folder (--out "
        "on the command line) or fix this one, then run again."
    )


@contextlib.contextmanager
def _writing(path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise output_error(exc, path) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail now, with a clear error, when no folder can be written at ``path`` (read-only, under a file).

    Called before long work (``mq quantize`` calibrates for minutes before it writes). It creates nothing that
    stays: a probe file in ``path``, or in its nearest existing ancestor when ``path`` does not exist yet.
    """
    out = Path(path)
    with _writing(out):
        existing = out
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        probe = existing / f".mq-probe-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    return out


def _sibling(out: Path, kind: str) -> Path:
    """A fresh hidden name beside ``out`` that says whose it is: ``.<name>.mq-<kind>-<host>-<pid>-<random>``."""
    return out.parent / f".{out.name}.mq-{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: never treat one as dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove the staging and ``mq-old`` folders of ``out`` whose process (on this machine) is gone."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.mq-(?:stage|old)-{_HOST}-(\d+)-[0-9a-f]{{8}}")
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
            log.info("removing %s, left behind by a process that was killed while writing %s", entry, out)
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so the folder swapped in is complete after a crash."""
    if os.name != "posix":
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in [*files, "."]:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc 2.28+ (musl, old systems): two renames instead
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOENT):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(stage: Path, out: Path) -> list[Path]:
    """Put ``stage`` at ``out``; returns the folders now holding what ``out`` held before (to delete)."""
    aside: list[Path] = []
    for _ in range(_SWAP_ATTEMPTS):
        if out.exists():
            if _exchange(stage, out):
                return [*aside, stage]
            old = _sibling(out, "old")
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to move aside
                os.rename(out, old)
                aside.append(old)
        try:
            os.rename(stage, out)
            return aside
        except OSError as exc:  # another process put its result there in between: go round again
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise ExportError(f"cannot put the new {out} in place: other processes keep replacing it at the same time. "
                      "Let one process write each output folder, then run again.")


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _nothing(path: Path) -> bool:
    return False


def check_replaceable(out_dir: str | os.PathLike[str], *, owned: Callable[[Path], bool] = _nothing,
                      what: str = "a folder mq wrote") -> None:
    """Raise unless a staged write may replace ``out_dir``: it does not exist, is empty, or ``owned(path)``.

    mq replaces its output folders as a whole, so it refuses to swap away anything it did not write (``what``
    describes the folders it wrote, for the error). Cheap: callers run it before long work, too.
    """
    out = Path(os.path.realpath(out_dir))
    with _writing(out_dir):
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out_dir} is a file, not a folder; choose another output folder (--out on the "
                              "command line) or remove the file.")
        if out.is_dir() and any(out.iterdir()) and not owned(out):
            raise ExportError(f"{out_dir} already exists and is not {what}. mq replaces its output folders as a "
                              "whole, so it will not overwrite this one: choose another output folder (--out on "
                              "the command line), or empty or remove this one.")


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike[str], *, owned: Callable[[Path], bool] = _nothing,
                     what: str = "a folder mq wrote") -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces ``out_dir`` in one swap.

    ``out_dir`` must pass ``check_replaceable(out_dir, owned=owned, what=what)``, before the block and again just
    before the swap. When the block raises, only the staging folder is removed; ``out_dir`` is left exactly as it
    was. A symlink at ``out_dir`` is followed: the folder it points to is replaced and the link kept.
    """
    out = Path(os.path.realpath(out_dir))
    check_replaceable(out_dir, owned=owned, what=what)
    with _writing(out_dir):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        stage = _sibling(out, "stage")
        mode = stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~_umask()
        stage.mkdir()
        os.chmod(stage, mode)
    try:
        yield stage
        with _writing(out_dir):
            _fsync_tree(stage)
            check_replaceable(out_dir, owned=owned, what=what)  # again: another process may have written there
            aside = _swap_in(stage, out)
            _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for folder in aside:
        shutil.rmtree(folder, ignore_errors=True)
