"""One server per SQLite file, enforced: every `serve` on a SQLite file holds an exclusive lock on a file
beside it (`<database>.serve.lock`) for as long as it runs.

A server on SQLite assumes it is the only one: at start it requeues every job that was leased, since
only a predecessor that stopped or crashed can have leased it. A second server on the same file would
take over the jobs the first is running (each item sent twice, the first's results fenced out) and send
webhook deliveries beside it. So a start that cannot take the lock is refused before it changes anything.

The lock is `flock(2)` on a file of its own: the kernel releases it when the holder's process ends
however it ends (kill -9 included), so a restart after a crash is never refused, and it does not mix
with SQLite's own byte-range locks on the database. The file holds the holder's pid and whether it
serves or migrates, for the message; it is left in place when the server stops (removing it would let
a server lock a new file while another still holds the old one). Operator commands (`evalsvc keys`,
`secrets`, `cache`, `migrate`) may run beside a server on a schema at head; one that would migrate the
file takes the lock for the change, and is refused while a server holds it
(evalsvc.store.migrate.upgrade).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

SUFFIX = ".serve.lock"


SERVING = "serving"
MIGRATING = "migrating"  # an operator command changing the file's schema (evalsvc.store.migrate.upgrade)


class DatabaseInUse(Exception):
    """Another live process holds the file's lock: another evalsvc server serves the database, or an
    operator command is migrating it (`doing`)."""

    def __init__(self, lock_file: Path, pid: int | None, doing: str) -> None:
        self.lock_file = lock_file
        self.pid = pid  # None when the holder had not written it yet (or it could not be read)
        self.doing = doing
        who = "an evalsvc command" if doing == MIGRATING else "another evalsvc server"
        what = "is migrating it" if doing == MIGRATING else "serves it"
        super().__init__(f"{who}{'' if pid is None else f' (pid {pid})'} {what}")


def lock_file(database: Path) -> Path:
    """The lock file of a SQLite database file: beside the file itself (through symbolic links, as SQLite
    opens it), so every path that names the same file names the same lock."""
    real = database.resolve()
    return real.with_name(real.name + SUFFIX)


class ServeLock:
    """The lock of one SQLite database file, taken by `acquire` and held until `release` (or the process ends)."""

    def __init__(self, database: Path, doing: str = SERVING) -> None:
        self.database = database.resolve()
        self.path = lock_file(database)
        self.doing = doing  # written beside the pid, for another start's message
        self._fd: int | None = None
        # (device, inode) of the lock file locked, and of the database file once it exists.
        self._locked: tuple[int, int] | None = None
        self._served: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting; DatabaseInUse when another holder has it (another process, or
        another ServeLock in this one: each opens the file anew), OSError when the lock file cannot be
        opened or locked. The descriptor is not inherited by the programs this process starts."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, doing = _read_holder(fd)
            os.close(fd)
            raise DatabaseInUse(self.path, pid, doing) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # By path, as `lost` looks (an fstat can name another device than a stat of the path: overlayfs).
        with contextlib.suppress(OSError):
            self._locked = _identity(os.stat(self.path))
        # The pid only names the holder in another start's message: a disk too full to write it is no
        # reason to refuse the start (the database step names a full disk).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.doing}\n".encode(), 0)

    def lost(self) -> str | None:
        """Why the paths no longer name the files this server holds (None while they do): the lock file
        or the database file was removed or replaced (its directory deleted, another file moved over it).
        The server then writes to a file no one will read again, and a second server can lock the new
        path and serve beside it: a probe removed the directory mid-run, the server went on SERVING and
        acknowledging writes that vanished at its exit, and a second start on the recreated directory
        succeeded. The database file's identity is taken at the first look that finds it (a new
        database is created after the lock is taken: the server looks once it has opened it).

        A copy written into the live file (`cp backup.db evalsvc.db`) keeps its identity and is not
        seen: restore with the server stopped (docs/operations.md, Backups)."""
        if self._locked is None:
            return None
        for what, path, held in (
            ("lock file", self.path, self._locked),
            ("database file", self.database, self._served),
        ):
            try:
                now = _identity(os.stat(path))
            except (FileNotFoundError, NotADirectoryError):
                if held is None:
                    continue  # not created yet
                return f"its {what} {path} was removed while it served"
            except OSError:
                continue  # cannot tell now (a network file system's hiccup): no reason to give the file up
            if held is None:
                self._served = now
            elif now != held:
                return f"its {what} {path} was replaced while it served"
        return None

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it); nothing when it is not held. The file
        stays, emptied of the pid."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _read_holder(fd: int) -> tuple[int | None, str]:
    """The holder's pid (None when unreadable) and what it does (a server when unsaid: older files)."""
    try:
        words = os.pread(fd, 64, 0).decode("ascii", errors="replace").split()
    except OSError:
        words = []
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, MIGRATING if words[1:2] == [MIGRATING] else SERVING
