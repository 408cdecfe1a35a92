"""Atomic writes that never delete what twinfold did not write.

A folder written by `atomic_directory` appears complete or not at all, and carries `twinfold-manifest.json`
(size and SHA-256 of each of its files): readers verify it (`verify_manifest`), and the overwrite rule uses it
to tell a twinfold folder from anything else (`check_replaceable`).
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "twinfold-manifest.json"
LEFTOVERS = (".tmp-", ".old-")  # what an interrupted `atomic_directory` or `atomic_write_bytes` leaves beside dst


class OverwriteRefused(FileExistsError):
    """An output path holds data twinfold did not write; nothing was changed."""


class UnwritableOutput(PermissionError):
    """An output's folder cannot be written; found before any work."""


@contextlib.contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False):
    """Yield a fresh temporary folder beside `dst`; on success it replaces `dst` in one rename.

    `dst` may be missing, empty or a folder twinfold wrote; anything else raises `OverwriteRefused` before
    any work unless `overwrite`. A crash inside the block leaves `dst` as it was (only a `.tmp-*` folder,
    which readers ignore).
    """
    dst = Path(dst)
    check_replaceable(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    try:
        yield tmp
        write_manifest(tmp)
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


def check_replaceable(dst: str | Path, overwrite: bool = False,
                      remedy: str = "Choose another folder or pass --overwrite / overwrite=True to replace it") -> None:
    """Raise `OverwriteRefused` (ending with `remedy`) unless `dst` is missing, empty, or a folder twinfold wrote.

    A twinfold folder has a manifest that lists every file now in it; a file added by hand makes it foreign.
    """
    dst = Path(dst)
    if overwrite or not (dst.exists() or dst.is_symlink()):
        return
    if not dst.is_dir() or dst.is_symlink():
        raise OverwriteRefused(f"{dst} exists and is not a folder twinfold wrote; nothing was changed. {remedy}")
    foreign = foreign_files(dst)
    if foreign:
        raise OverwriteRefused(
            f"{dst} holds {len(foreign)} file(s) twinfold did not write (e.g. {foreign[0]!r}); nothing was changed. "
            f"{remedy}")


def check_output_folder(folder: str | Path, owned: set[str], remedy: str, unscanned: frozenset = frozenset()) -> None:
    """Raise `OverwriteRefused` (ending with `remedy`) if `folder` holds entries other than the `owned` names, or
    a symbolic link among them or anywhere below them (`unscanned`: owned folders another library fills).

    For folders twinfold fills file by file (a run folder, an evaluation report): its own files there are
    replaced and nothing else is touched, but a folder holding anything else is refused up front; a link would
    make a write or a deletion there land outside the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in owned and not p.name.startswith(LEFTOVERS))
    if foreign:
        raise OverwriteRefused(
            f"{folder} holds {len(foreign)} entries twinfold did not write (e.g. {foreign[0]!r}); {remedy}")
    refuse_symlinks(folder, owned, remedy, unscanned)


def refuse_symlinks(folder: str | Path, owned: set[str], remedy: str, unscanned: frozenset = frozenset()) -> None:
    """Raise `OverwriteRefused` if a symbolic link is among the `owned` entries of `folder` or anywhere below them
    (`unscanned`: owned folders another library fills): a write or deletion through it would land elsewhere."""
    folder = Path(folder)
    for name in sorted(owned):
        if link := first_symlink(folder / name, scan=name not in unscanned):
            raise OverwriteRefused(f"{link} is a symbolic link; twinfold does not write or delete through links "
                                   f"(it could change files outside {folder}); remove the link or {remedy}")


def first_symlink(path: Path, scan: bool = True) -> Path | None:
    """`path` if it is a symbolic link, else (`scan`) the first link below it, found without following links."""
    if path.is_symlink():
        return path
    if scan and path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in sorted(dirs + files):
                if (Path(root) / name).is_symlink():
                    return Path(root) / name
    return None


def remove_tree(path: Path, root: Path) -> bool:
    """Delete the folder `path` under `root` unless a symbolic link is on the way (`path` or a folder between
    `root` and it): a deletion never goes through a link. True if it was deleted."""
    rel = Path(path).relative_to(root)
    if any((Path(root) / p).is_symlink() for p in (rel, *rel.parents) if p != Path(".")):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def check_writable(dst: str | Path, what: str) -> None:
    """Raise `UnwritableOutput` naming `what` (an option) unless a file can be created where `dst` will be.

    The probe goes into `dst`'s folder, or its nearest existing ancestor when folders are still to be made.
    """
    folder = Path(dst).absolute().parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UnwritableOutput(f"{what}: cannot write {dst} ({folder}: {e.strerror or e}); nothing was done") from None


def foreign_files(folder: Path) -> list[str]:
    """Files in `folder` (relative paths, sorted) that its manifest does not list; all of them if it has none."""
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    listed = _read_manifest(folder)
    if listed is None:
        return present
    return [name for name in present if name != MANIFEST and name not in listed]


def write_manifest(folder: Path) -> None:
    """Record size and SHA-256 of every file under `folder` in its manifest."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_manifest(folder: Path) -> str | None:
    """None if every file the manifest lists is there with its size and checksum; else what is wrong, in words."""
    listed = _read_manifest(folder)
    if listed is None:
        return f"{MANIFEST} is missing or unreadable"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _read_manifest(folder: Path) -> dict | None:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(dst: str | Path, data: bytes) -> None:
    """Write `data` to `dst` through a temporary file and a rename."""
    with atomic_file(dst) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(dst: str | Path):
    """Yield a binary file beside `dst` to write in pieces; on success it replaces `dst` in one rename, on an
    error it is deleted and `dst` stays as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dst.name}-", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
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
