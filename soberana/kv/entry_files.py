"""Entry files on a filesystem: names, atomic publication, whole-file reads.

Shared by the disk tier and the shared-directory tier. An entry for block hash `h` lives at
`<root>/<h[:2] hex>/<h hex>.kv`; the two-hex-digit fan-out keeps directories small.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

ENTRY_SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
# A write failing with one of these means the filesystem (or the user's quota) is full.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def entry_path(root: Path, key: bytes) -> Path:
    """Where the entry for `key` lives under `root`."""
    name = key.hex()
    return root / name[:2] / f"{name}{ENTRY_SUFFIX}"


def key_from_name(name: str) -> bytes | None:
    """The block hash an entry file name stands for, or None for any other file."""
    if not name.endswith(ENTRY_SUFFIX):
        return None
    stem = name[: -len(ENTRY_SUFFIX)]
    if len(stem) != 64:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """Publish `data` at `path` so that readers see all of it or nothing.

    The bytes go to a uniquely named temporary file in the same directory, are fsynced, then
    renamed over `path`: rename is atomic on POSIX filesystems (NFS included), and a writer
    killed at any point leaves at most a temporary file that no reader opens. The directory
    is not fsynced: losing a rename in a power cut loses an entry (a miss), never corrupts one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_whole(path: Path) -> bytearray | None:
    """The file's bytes (a writable buffer, so tensors can wrap it), or None when absent."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            got = f.readinto(buf)
    except FileNotFoundError:
        return None
    # A file that shrank under us reads short; the entry check then rejects it.
    return buf if got == size else buf[:got]


def scan_entries(root: Path) -> Iterator[os.DirEntry]:
    """Every file in the fan-out directories under `root` (entries and temporaries)."""
    try:
        fanouts = list(os.scandir(root))
    except FileNotFoundError:
        return
    for fanout in fanouts:
        if not fanout.is_dir(follow_symlinks=False):
            continue
        try:
            yield from (e for e in os.scandir(fanout.path) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            continue  # removed by another process between the two scans
