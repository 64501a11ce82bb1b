"""What a job may read: the objects under its input prefix (or its manifest's folder), nothing else.

The planner applies `outside_input` when it lists, and the worker applies it again before it
opens each item: a shard's manifest is a file in the output prefix, and whoever can write
there could otherwise point a line at any object the workers' credentials can read
(another bucket, /etc, a secret next to the input). One function for both, so the two
never disagree about what lies inside.
"""

from __future__ import annotations

import os
import posixpath
import re
from urllib.parse import quote, unquote

INPUT_LIST_SUFFIXES = frozenset({".txt", ".jsonl", ".lst"})
TABLE_SUFFIXES = frozenset({".parquet", ".arrow"})  # tables whose rows are images (parquetinputs.py)


_BRACE = re.compile(r"(?:\{|%7[bB])(\d+)\.\.(\d+)(?:\}|%7[dD])")  # as typed, or in a file:// URI


def brace_range(input_uri: str) -> tuple[int, int, int, str, str] | None:
    """(start, end, width, text before, text after) of a `{00000..00099}` range in the input's last
    path component (img2dataset's tar shard sets); None without one."""
    match = _BRACE.search(input_uri)
    if match is None or "/" in input_uri[match.end():]:
        return None
    first, last = match.groups()
    return int(first), int(last), len(first), input_uri[:match.start()], input_uri[match.end():]


def input_root(input_uri: str) -> str:
    """The prefix every item of a job must lie under: the input prefix, or a manifest file's folder, a
    single .parquet object's folder (where the images its `path` cells name lie), or the folder of a
    `{00000..00099}.tar` range."""
    if brace_range(input_uri) is not None:
        return input_uri.rsplit("/", 1)[0]
    stripped = input_uri.rstrip("/")
    if posixpath.splitext(stripped.lower())[1] in INPUT_LIST_SUFFIXES | TABLE_SUFFIXES:
        return stripped.rsplit("/", 1)[0]
    return stripped


def outside_input(uri: str, root: str) -> str | None:
    """Why `uri` is not the job's to read, or None when it lies under `root` (both canonical URIs).

    Keys are compared as written, never URL-parsed (`#`, `?` and `%` are ordinary characters of
    an S3 key). A `.` or `..` segment is refused outright: S3 keeps it literally, but proxies and
    S3-compatible servers may normalize it away to another key. Local paths are also compared
    after resolving symlinks, so a link inside the input that points out of it is outside.
    """
    base = root.rstrip("/") + "/"
    if not uri.startswith(base):
        return f"{uri} is outside the job's input {root}: not read"
    relative = uri[len(base):]
    if uri.startswith("file://"):
        relative = unquote(relative)
    if any(segment in (".", "..") for segment in relative.split("/")) or "\x00" in relative:
        return f"{uri} has a '.' or '..' segment, so it counts as outside the job's input {root}: not read"
    if uri.startswith("file://") and not local_path_inside(_path(uri), _path(root)):
        return f"{uri} resolves (through a symlink) to a path outside the job's input {root}: not read"
    return None


def path_cell_uri(table_uri: str, path: str) -> str:
    """Where a table's `path` cell (a `datasets` Image stored by reference) points: a URI as written, an
    absolute local path as a file:// URI (what `datasets` writes), else a key relative to the table's folder.

    Nothing is normalized away: a `..` segment stays and `outside_input` refuses it. ValueError for a path
    that names no object (a relative one climbing out of the folder, another host, a backslash)."""
    if path.startswith("s3://"):
        return path
    if path.startswith("file://"):
        if not path.startswith("file:///"):
            raise ValueError(f"image path {path!r} names another host")
        path = unquote(path[len("file://"):])
    if path.startswith("/"):
        return "file://" + quote(path)
    segments = path.split("/")
    if any(segment in ("", ".", "..") or "\\" in segment or "\x00" in segment for segment in segments):
        raise ValueError(f"image path {path!r} leaves the table's folder")
    base = table_uri.rsplit("/", 1)[0]
    return base + "/" + "/".join(quote(s) if table_uri.startswith("file://") else s for s in segments)


def local_path_inside(path: str, root: str) -> bool:
    """True when `path`, with every symlink resolved, is `root` or lies under it (also resolved)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _path(file_uri: str) -> str:
    return unquote(file_uri[len("file://"):])
