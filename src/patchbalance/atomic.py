"""Writing files atomically, and checking up front that they can be written.

A file is written to a temporary name next to its target and moved onto it only when complete,
so a reader never sees half a table and a failed run leaves the old file in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from patchbalance.errors import OutputError


def check_writable(path: Path, what: str) -> None:
    """Raise `OutputError` unless a file can be written at `path`.

    `path` must not be a folder; its folder must exist (or be made here) and take a test
    file, created and deleted at once. The test file is the only check that holds as root
    (where permission bits stop nothing) and on /proc or read-only mounts.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{path}: {what} names a folder, not a file; give a file name in that folder"
        )
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot create the output folder for {what}: {exc.strerror}"
        ) from exc
    _write_test_file(folder, path, what)


def check_writable_folder(folder: Path, what: str) -> None:
    """Raise `OutputError` unless files can be written in `folder` (made later when missing).

    An existing `folder` must be a folder that takes a test file; a missing one needs its
    nearest existing parent to. Nothing is left behind.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {what} is a file, not a folder; give a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{folder}: cannot create {what}: {existing} is a file, not a folder")
    _write_test_file(existing, folder, what)


def _write_test_file(folder: Path, target: Path, what: str) -> None:
    try:
        handle, probe = tempfile.mkstemp(prefix=".patchbalance-write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"{target}: cannot write {what} in {folder} ({reason}); choose a writable folder"
        ) from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def publish(temporary: str | os.PathLike[str], path: Path) -> None:
    """Move a finished temporary file onto `path` with ordinary file permissions.

    `tempfile.mkstemp` creates files readable by their owner only; an output should get the
    permissions any new file gets (0666 less the umask), so others can read the tables.
    """
    os.chmod(temporary, 0o666 & ~_umask())
    os.replace(temporary, path)


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Yield a temporary file next to `path` that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as stream:
            yield stream
        publish(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)` and move the result onto `path` only if it succeeds.

    The temporary path does not exist yet and has `path`'s name, inside a private folder next
    to `path`: writers that refuse an existing file (GDAL's GeoPackage driver) or leave side
    files behind (a journal) work too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(folder) / path.name
    try:
        write(temporary)
        publish(temporary, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_copy(source: Path, path: Path) -> None:
    """Make `path` an atomic copy of `source`: a hard link when the file system allows one."""

    def link_or_copy(temporary: Path) -> None:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    atomic_write_with(path, link_or_copy)
