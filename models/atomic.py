"""Atomic writes: a folder or file appears complete or not at all."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(dst: str | Path):
    """Yield a fresh temporary folder beside `dst`; on success it replaces `dst` in one rename.

    A crash inside the block leaves `dst` as it was (only a `.tmp-*` folder, which readers ignore).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(dst: str | Path, data: bytes) -> None:
    """Write `data` to `dst` through a temporary file and a rename."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dst.name}-", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
