"""Writing files atomically, as one set, and checking up front that they can be written.

A file is written to a temporary name next to its target and moved onto it only when complete,
so a reader never sees half a table and a failed run leaves the old file in place. Inside
`output_set()`, the files are all written first and then moved into place in the order they
were written (a build writes its summary last, holding every other file's SHA-256): a kill
before the first move leaves the previous set, a kill after the last leaves the new one, and
during the moves the summary's hashes show which file is newer than the summary.

Temporary names are `.pb-<tag>.<pid>-<random>.tmp` (a file, or a folder holding `<name>`), where
`<tag>` is a short hash of `<name>`: at most 40 bytes whatever the length of `<name>`, so that a
temporary can be made wherever its target can. Before writing `<name>`, the temporaries of
`<name>` left by a process that no longer runs (a run that was killed) are removed, those of
earlier versions (`.<name>.<pid>-<random>.tmp`) too.

A name that no file system takes (a part of the path over 255 bytes) is an `OutputError` from
the up-front checks, before any work.

Disk full (ENOSPC, EDQUOT) while writing is an `OutputError` naming the file; the temporary is
removed and the previous file is kept.

For tests only: with `PATCHBALANCE_DEBUG_KILL_AT=staged:<name>` (or `published:<name>`) the
process sends itself SIGKILL right after `<name>`'s temporary is complete (or after it was moved
into place), so a test can kill a real build at a chosen point. Unset, nothing changes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np

from patchbalance.errors import OutputError

log = logging.getLogger(__name__)

DEBUG_KILL_AT = "PATCHBALANCE_DEBUG_KILL_AT"
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# Free bytes below which a failed write is taken for a full disk (GDAL keeps no errno).
_ALMOST_FULL = 1 << 20
# Temporaries this process made: a killed run may have had the same process id (containers).
_OURS: set[str] = set()
# The longest name of one file or folder that common file systems take (ext4, XFS, APFS, NTFS).
NAME_MAX_BYTES = 255


def check_name_lengths(path: Path, what: str) -> None:
    """Raise `OutputError` when a part of `path` is longer than a file system takes."""
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX_BYTES:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise OutputError(
                f"{what}: the name '{shown}' is {size} bytes long; file systems take at most "
                f"{NAME_MAX_BYTES} bytes per name: choose a shorter one"
            )


def check_writable(path: Path, what: str) -> None:
    """Raise `OutputError` unless a file can be written at `path`.

    `path` must not be a folder; its folder must exist (or be made here) and take a test
    file, created and deleted at once. The test file is the only check that holds as root
    (where permission bits stop nothing) and on /proc or read-only mounts.
    """
    path = Path(path)
    check_name_lengths(path, what)
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
    check_name_lengths(folder, what)
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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Temporaries: their names, and removing those of killed runs


def _name_tag(path: Path) -> str:
    return hashlib.sha256(os.fsencode(path.name)).hexdigest()[:12]


def _temporary_prefix(path: Path) -> str:
    return f".pb-{_name_tag(path)}.{os.getpid()}-"


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    # Earlier versions wrote `.<name>.<pid>-<random>.tmp`, and before that no `<pid>-`.
    names = f"pb-{_name_tag(path)}|{re.escape(path.name)}"
    return re.compile(rf"\.(?:{names})\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` that a killed run left in its folder; return them.

    A temporary is stale when the process named in it no longer runs, or is this process but
    did not make it; temporaries without a process id come from earlier versions.
    """
    path = Path(path)
    pattern = _temporary_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or os.path.abspath(entry.path) in _OURS:
            continue
        pid = match.group(1)
        if pid is not None and int(pid) != os.getpid() and _running(int(pid)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:
            continue  # removed meanwhile by another run
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted run: %s", entry.path, exc)
            continue
        log.info("removed %s, left by an interrupted run", entry.path)
        removed.append(Path(entry.path))
    return removed


def _disk_full_reason(exc: BaseException, folder: Path) -> str | None:
    """Return why the disk is full when a write into `folder` failed with `exc`, else None.

    Python and Arrow keep the errno; GDAL (GeoTIFF, GeoPackage) reports only "write failed", so
    a failed write into a file system with (almost) no room left counts as disk full too. Call
    it before the temporary is removed, while the file system is still full.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return _DISK_FULL[seen.errno]
        text = str(seen).lower()
        for reason in _DISK_FULL.values():
            if reason in text:
                return reason
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, Exception):
        return None  # an interrupt, not a failed write
    try:
        room = os.statvfs(folder)
    except OSError:
        return None
    if room.f_bavail * room.f_frsize < _ALMOST_FULL or (room.f_files and room.f_favail == 0):
        return _DISK_FULL[errno.ENOSPC]
    return None


def _debug_kill(event: str, path: Path) -> None:
    if os.environ.get(DEBUG_KILL_AT) == f"{event}:{path.name}":
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Staged files and sets


@dataclass
class _Staged:
    """A complete temporary file waiting to be moved onto `path`."""

    path: Path
    temporary: Path
    holder: Path | None  # the private folder around `temporary`, if any

    def commit(self) -> None:
        publish(self.temporary, self.path)
        self.discard()
        _debug_kill("published", self.path)

    def discard(self) -> None:
        made = self.holder or self.temporary
        if self.holder is not None:
            shutil.rmtree(self.holder, ignore_errors=True)
        elif os.path.lexists(self.temporary):
            os.unlink(self.temporary)
        _OURS.discard(os.path.abspath(made))


@dataclass
class OutputSet:
    """The files written inside one `output_set()` block: staged, then published in order."""

    staged: list[_Staged] = field(default_factory=list)
    sha256: dict[Path, str] = field(default_factory=dict)

    def add(self, staged: _Staged) -> None:
        with open(staged.temporary, "rb") as stream:
            os.fsync(stream.fileno())  # complete on disk before anything is moved
        self.sha256[staged.path] = file_sha256(staged.temporary)
        self.staged.append(staged)

    def hashes(self, paths: dict[str, str]) -> dict[str, str]:
        """Return the SHA-256 of each of `paths` (name -> file) written so far in this set."""
        return {
            name: self.sha256[Path(path)]
            for name, path in paths.items()
            if Path(path) in self.sha256
        }


_CURRENT_SET: ContextVar[OutputSet | None] = ContextVar("patchbalance_output_set", default=None)


@contextmanager
def output_set() -> Iterator[OutputSet]:
    """Stage every atomic write in the block; publish them in order when the block succeeds.

    Every file is complete (and synced) before the first is moved into place, so a failure or a
    full disk in the block leaves every previous file as it was; the file written last is
    moved last.
    """
    written = OutputSet()
    token = _CURRENT_SET.set(written)
    try:
        yield written
    except BaseException:
        for staged in written.staged:
            staged.discard()
        raise
    finally:
        _CURRENT_SET.reset(token)
    try:
        for staged in written.staged:
            staged.commit()
    finally:
        for staged in written.staged:
            staged.discard()


def _finish(staged: _Staged) -> None:
    """Publish `staged` now, or add it to the set being written."""
    _debug_kill("staged", staged.path)
    current = _CURRENT_SET.get()
    try:
        if current is None:
            staged.commit()
        else:
            current.add(staged)
    except BaseException as exc:
        _discard_and_raise(staged, exc)


def _discard_and_raise(staged: _Staged, exc: BaseException) -> NoReturn:
    """Remove `staged`'s temporary; raise a one-line `OutputError` when the disk is full."""
    reason = _disk_full_reason(exc, staged.path.parent)
    staged.discard()
    if reason is not None:
        path = staged.path
        raise OutputError(
            f"{path}: the disk is full ({reason}) while writing this file; free some space or "
            f"choose another folder (the previous {path.name}, if any, is unchanged)"
        ) from None
    raise exc


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Yield a temporary file next to `path` that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, temporary = tempfile.mkstemp(
        prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent
    )
    _OURS.add(os.path.abspath(temporary))
    staged = _Staged(path, Path(temporary), None)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as stream:
            yield stream
    except BaseException as exc:
        _discard_and_raise(staged, exc)
    _finish(staged)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)` and move the result onto `path` only if it succeeds.

    The temporary path does not exist yet and has `path`'s name, inside a private folder next
    to `path`: writers that refuse an existing file (GDAL's GeoPackage driver) or leave side
    files behind (a journal) work too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    folder = tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    _OURS.add(os.path.abspath(folder))
    staged = _Staged(path, Path(folder) / path.name, Path(folder))
    try:
        write(staged.temporary)
    except BaseException as exc:
        _discard_and_raise(staged, exc)
    _finish(staged)


def atomic_copy(source: Path, path: Path) -> None:
    """Make `path` an atomic copy of `source`: a hard link when the file system allows one."""

    def link_or_copy(temporary: Path) -> None:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)

    atomic_write_with(path, link_or_copy)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_writer(Path(path), "w") as stream:
        json.dump(data, stream, indent=2, default=_json_default)
        stream.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
