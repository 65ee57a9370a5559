"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of either.

Every file the platform publishes (catalogs, registries, checkpoints, training sets)
and every folder it swaps (counting-feature tables) goes through here.

Example::

    atomic_write_text(path, json.dumps(state))
    with atomic_path(out_path) as tmp:           # any writer that takes a path
        pq.write_table(table, tmp)
    replace_directory(staging_dir, table_dir)    # swap a whole folder in one step
    publish_directory(staging_dir, day_dir)      # a new folder appears whole; an existing one is never replaced
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def publish_directory(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``, which must not exist yet: it appears whole or not at all.

    For what is immutable once written (a published day, a snapshot): a second writer gets
    :class:`FileExistsError` instead of replacing the first one's folder.
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, target)
    except OSError as error:
        if target.exists():
            message = "already exists: published folders are never replaced"
            raise FileExistsError(errno.EEXIST, message, str(target)) from error
        raise


def replace_directory(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target`` in one step, replacing what was there.

    A new target is one ``rename``. An existing one is exchanged with the staging folder
    by Linux's ``renameat2(RENAME_EXCHANGE)``, so readers of ``target`` never find it
    missing or mixed; the old content, now at ``staging``, is then removed. Where the
    exchange is not available, the old folder is moved aside first (a brief gap, no mix).
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(staging, target)
        return
    if not _exchange(staging, target):
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(target, aside)
        os.rename(staging, target)
        staging = aside
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without the exchange
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))
