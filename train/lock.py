"""One run per output folder: `OUTPUT/run.lock` holds the pid of the run writing there.

The lock is an `flock` on that file, so the kernel drops it when its process ends, however it ends; a lock
file that still names a pid but is not held was left by a run that died (a stale lock), and is taken over.
"""
import atexit
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from twinfold.train.config import ConfigError

LOCK_FILE = "run.lock"
log = logging.getLogger("twinfold")


class RunLock:
    """Holds `FOLDER/run.lock` from `acquire` until `release` (or until the process exits)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._file = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ConfigError naming the pid of the run that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"train.output_dir: cannot write to {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(f))
            f.close()
            raise ConfigError(f"train.output_dir: {self.path.parent} is in use by another run ({holder}); wait for "
                              "it to end or stop it, or choose another train.output_dir") from None
        if previous := _read(f):
            log.warning("train.output_dir: taking over the stale lock of %s, which is gone", _describe(previous))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
        f.flush()
        self._file = f
        atexit.register(self.release)  # also when the run ends in an error
        return self

    def release(self) -> None:
        """Empty the lock file (no run) and let go of it; the file stays, so no two runs ever lock different files."""
        atexit.unregister(self.release)
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.close()
            self._file = None


def _read(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {"pid": "unknown"}


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"pid {holder.get('pid', 'unknown')} on {holder.get('host', 'this machine')}, since {since}"
