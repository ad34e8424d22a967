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


def new_hash(name: str):
    """A running hash by name: "xxh3_128" (xxhash, a dependency of datasets: damage detection at memory speed) or any
    hashlib name ("sha256")."""
    if name == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(name)


class HashingWriter:
    """Wraps a binary file: every write also goes into a running hash and a byte count, so a file's checksum is known
    when it is closed, without reading it back. Keeps the first OSError of the real file (torch.save, writing through
    it, reports a full disk as a RuntimeError without the OS error)."""

    def __init__(self, f: IO[bytes], algorithm: str = "sha256"):
        self._f = f
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self.nbytes = 0
        self.os_error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            written = self._f.write(view)
        except OSError as e:
            self.os_error = self.os_error or e
            raise
        self._hash.update(view)
        self.nbytes += view.nbytes
        return written

    def flush(self) -> None:
        self._f.flush()

    def digest(self) -> dict:
        """{"bytes": size, <algorithm>: hex digest}, the form manifests record."""
        return {"bytes": self.nbytes, self.algorithm: self._hash.hexdigest()}


def file_digest(path: str, algorithm: str = "sha256", bufsize: int = 1 << 22) -> dict:
    """{"bytes": size, <algorithm>: hex digest} of a file, read in 4 MiB blocks."""
    h, n = new_hash(algorithm), 0
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
            n += len(block)
    return {"bytes": n, algorithm: h.hexdigest()}
