"""Files that are either absent or complete: the project's one way of writing a file that others may read.

    with atomic_write("out/manifest.json", "w") as f:
        json.dump(manifest, f)

The content goes to a temporary name in the same folder (`<name>.tmp-<random>`), is flushed and fsynced, then
renamed over the final name, and the folder is fsynced so that the rename survives a power loss. A reader sees
the old file or the whole new one, never part of one. On an error the temporary file is removed; a process
killed outright leaves it behind under its temporary name (`TMP_MARK` finds those), never under the final one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from typing import IO, Iterator

TMP_MARK = ".tmp-"


def fsync_dir(folder: str) -> None:
    """Make the renames in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", exclusive: bool = False) -> Iterator[IO]:
    """Write `path` all at once (see the module docstring). `mode` is "wb" or "w" (UTF-8 text).
    `exclusive`: create the file only if it does not exist yet, raising FileExistsError otherwise (a hard
    link instead of a rename: atomic, and only one of several concurrent writers wins)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', not {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions from the umask, as open()
    try:
        with open(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


class HashingWriter:
    """Wraps a binary file: every write also goes into a running sha256 and a byte count, so a file's
    checksum is known when it is closed, without reading it back."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> None:
        view = memoryview(data)
        self._f.write(view)
        self.sha256.update(view)
        self.nbytes += view.nbytes


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()
