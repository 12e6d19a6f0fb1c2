"""Writing results atomically: every file appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _temp_path(final: Path) -> Path:
    fd, name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=".part" + "".join(final.suffixes[-2:]), dir=final.parent
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with staged([Path(path)]) as (temp,):
        temp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary paths to write; on success all are renamed to ``paths``, on any error all are removed."""
    paths = [Path(p) for p in paths]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        for p in paths:
            temps.append(_temp_path(p))
        yield temps
        for t in temps:
            with open(t, "rb+") as fh:
                os.fsync(fh.fileno())
        for t, p in zip(temps, paths):
            os.replace(t, p)
    finally:
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()


def write_all(writers: dict[Path, Callable[[Path], None]]) -> list[Path]:
    """Run each ``writer(temp_path)`` and publish all files together, or none if one fails."""
    paths = list(writers)
    with staged(paths) as temps:
        for temp, path in zip(temps, paths):
            writers[path](temp)
    return paths
