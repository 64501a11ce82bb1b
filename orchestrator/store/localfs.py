"""The local filesystem side of ObjectStore: listing in key order without leaving the root,
reading only regular files inside it, and durable atomic writes."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

from orchestrator.errors import ObjectNotFound, ObjectTooLarge, ObjectUnreadable, OutsideInput, StorageError
from orchestrator.store.scope import local_path_inside


def local_path(uri: str) -> Path:
    """The path a file:// URI names. Anything else is refused: cutting a scheme off a plain path
    (`/tmp/zz/x.json` -> `-x.json`...) would read or write somewhere the caller never named."""
    if not uri.startswith("file://"):
        raise StorageError(f"not a file:// URI: {uri!r} (storage.normalize_uri makes one of a local path)")
    rest = uri[len("file://"):]
    return Path(unquote(rest[len("localhost"):] if rest.startswith("localhost/") else rest))


PARTIAL_SUFFIX = ".vitbatch-partial"


def is_partial_write(name: str) -> bool:
    """A temporary file of `ObjectStore.write`, renamed into place once complete."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


@cache
def current_umask() -> int:
    # os.umask can only be read by setting it: done once, not raced by writer threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def walk_sorted(directory: Path, root: str, skipped: list[tuple[Path, str]],
                 ancestors: frozenset[tuple[int, int]]) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files under `directory` in full-key order, as S3 lists them: 'a-b' < 'a.png' < 'a/x'.

    os.walk yields a folder's files before its subfolders, which is not key order. Symlinks are
    followed while they resolve inside `root` (the real input folder): a link out of it, a loop,
    a FIFO, socket or device, or an entry that cannot be examined is not yielded but named in
    `skipped`, and one entry's error never ends the listing. `ancestors` ((st_dev, st_ino) of
    the folders above) stops a link to a folder above it from recursing for ever.
    """
    try:
        with os.scandir(directory) as scan:
            entries = list(scan)
    except OSError as e:
        skipped.append((directory, f"cannot be listed ({_os_reason(e)})"))
        return
    named = []
    for entry in entries:
        examined = _examine(entry, root)
        if not isinstance(examined, os.stat_result):
            if examined:
                skipped.append((Path(entry.path), examined))
            continue
        is_dir = stat.S_ISDIR(examined.st_mode)
        named.append((entry.name + "/" if is_dir else entry.name, is_dir, Path(entry.path), examined))
    for _, is_dir, path, info in sorted(named, key=lambda row: row[0]):
        if not is_dir:
            yield path, info
        elif (info.st_dev, info.st_ino) in ancestors:
            skipped.append((path, "a symlink loop (links to a folder above it): not followed"))
        else:
            yield from walk_sorted(path, root, skipped, ancestors | {(info.st_dev, info.st_ino)})


def _examine(entry: os.DirEntry, root: str) -> os.stat_result | str | None:
    """The stat of a folder or regular file the listing keeps, else why it is skipped
    (None: skipped without a word)."""
    try:
        info = os.stat(entry.path)  # follows symlinks
    except FileNotFoundError:  # a broken link, or removed (renamed into place) since the scan
        return "a broken symlink" if entry.is_symlink() else None
    except OSError as e:
        return _os_reason(e)
    if entry.is_symlink() and not local_path_inside(entry.path, root):
        return "a symlink to a path outside the input: not followed"
    if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
        return info
    return "not a regular file (a FIFO, socket or device): never opened"


def relative_path(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else "."


def _os_reason(error: OSError) -> str:
    """An OSError as the words an error row or a plan summary shows."""
    words = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ELOOP: "a symlink loop", errno.ENAMETOOLONG: "name too long"}
    fallback = error.strerror or type(error).__name__
    return words.get(error.errno, fallback) if error.errno is not None else fallback


def _open_regular(uri: str, path: Path) -> int:
    """A read-only descriptor of the regular file at `path`, opened without blocking (a FIFO named
    .png would hang a reader thread for ever); ObjectNotFound or ObjectUnreadable with the reason."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            _refuse_non_regular(uri, os.stat(path).st_mode)
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ObjectNotFound(f"{uri} does not exist") from e
    except OSError as e:
        raise ObjectUnreadable(f"{uri} cannot be read: {_os_reason(e)}") from e


def read_local(uri: str, max_bytes: int | None, within: str | None) -> bytes:
    """Open without blocking (a FIFO named .png would hang a reader thread for ever), then read
    only a regular file, at most `max_bytes` + 1 bytes of it (a file growing meanwhile)."""
    path = local_path(uri)
    fd = _open_regular(uri, path)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):  # swapped for a FIFO between the stat and the open
            _refuse_non_regular(uri, info.st_mode)
        if within is not None and not local_path_inside(_opened_path(f.fileno(), path), str(local_path(within))):
            raise OutsideInput(f"{uri} resolves to a file outside the job's input {within}: not read")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ObjectTooLarge(f"object is {info.st_size} bytes, over the cap of {max_bytes}")
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLarge(f"object grew past the cap of {max_bytes} bytes while it was read")
    return data


def read_local_range(uri: str, start: int, length: int, within: str | None) -> bytes:
    """Bytes [start, start + length) of a regular file, with `read_local`'s checks (no FIFO, inside `within`)."""
    path = local_path(uri)
    fd = _open_regular(uri, path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _refuse_non_regular(uri, os.fstat(fd).st_mode)
        if within is not None and not local_path_inside(_opened_path(fd, path), str(local_path(within))):
            raise OutsideInput(f"{uri} resolves to a file outside the job's input {within}: not read")
        return os.pread(fd, max(length, 0), start)
    finally:
        os.close(fd)


def _refuse_non_regular(uri: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ObjectNotFound(f"{uri} does not exist (it is a folder)")
    raise ObjectUnreadable(f"{uri} is not a regular file (a FIFO, socket or device): never opened")


def _opened_path(fd: int, path: Path) -> str:
    """The real path of the file behind `fd` (Linux names it in /proc), else `path` resolved."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


current_umask()
