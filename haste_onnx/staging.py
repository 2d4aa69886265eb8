"""Files written whole or not at all, and several of them together: a model, its report, its plot.

Each file is written under its own name in a new temporary directory beside its destination and
moved into place by :meth:`Staging.commit`; whatever is not committed is removed on leaving the
``with`` block. A failure while writing any of them therefore leaves no file, new or partial,
and never touches an existing one; a failure while moving them into place puts back the old
files (see :meth:`Staging.commit` for the one case it cannot).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from haste_onnx.errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX: directories of killed runs stay
    fcntl = None  # type: ignore[assignment]

# How old an unlocked directory of a run must be to count as abandoned (a live run's is unlocked
# only between its creation and its lock: a margin far beyond that).
_ABANDONED_AFTER = 600.0  # seconds


def check_writable(path: Path, what: str = "output") -> None:
    """Refuse a file path (``what``: the option it comes from) that is a directory, a device or
    a pipe, or in /dev or /proc (/dev/stdout when it is a file) (a file is written beside it and
    renamed over it, which would replace a device, not write to it), or whose directory is
    missing or read-only: checked before any work, not
    found out after it. A symbolic link is replaced by the file, like any other old file, so
    that a model's data file lies beside the path given."""
    if not path.name:
        raise InputError(f"{what} path {str(path)!r} names no file")
    try:
        try:
            mode: int | None = os.stat(path).st_mode  # through a link: what it names
        except FileNotFoundError:  # a new file, or a link to none
            mode = None
        if mode is not None and stat.S_ISDIR(mode):
            raise InputError(f"{what} path is a directory: {path}")
        if mode is not None and not stat.S_ISREG(mode):
            raise InputError(f"{what} path {path} is not a regular file (a device or a pipe)")
        directory = path.parent
        if not directory.is_dir():
            raise InputError(f"{what} directory does not exist: {directory}")
        if _in_dev_or_proc(path):
            raise InputError(
                f"{what} path {path} is not a file in a folder but a device or a process's open "
                "file (it would be replaced, not written to)"
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InputError(f"{what} directory is not writable: {directory}")
    except OSError as exc:  # a name too long, a loop of links, a directory that cannot be read
        raise InputError(f"{what} path {path}: {exc.strerror or exc}") from None


def _in_dev_or_proc(path: Path) -> bool:
    """Whether ``path``, or a link on the way from it to a file, lies in /dev or /proc:
    /dev/stdout and /dev/fd/1, or a link of one's own to /proc/self/fd/1, name a file a process
    has open (a regular file when stdout is redirected to one), not a place to write a file."""
    for _ in range(40):  # Linux's own limit on links followed
        folder = real(path.parent)
        if folder == Path("/dev") or Path("/proc") in (folder, *folder.parents):
            return True
        if not path.is_symlink():
            return False
        path = folder / os.readlink(path)
    return False


def real(path: Path) -> Path:
    """The file ``path`` reads, its links resolved, for telling whether two paths are one file
    (unlike Path.resolve, never an error, a loop of links included)."""
    return Path(os.path.realpath(path))


def real_destination(path: Path) -> Path:
    """The file writing ``path`` replaces: a link there is replaced, not what it names."""
    return real(path.parent) / path.name


def scratch_directory(folder: Path, prefix: str) -> tuple[Path, int | None]:
    """A new directory in ``folder`` for one run's files, and the descriptor that holds a lock
    on it (flock) until it is closed or the process ends, however it ends. A run killed outright
    (SIGKILL, an out-of-memory kill, a CI job's timeout) cannot remove its directory; so this
    first removes every ``prefix`` directory in ``folder`` that no process holds and that is
    older than ten minutes. Where there is no flock (another OS, some network file systems),
    nothing is removed."""
    for entry in _entries(folder, prefix):
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime < _ABANDONED_AFTER:
                continue
            lock = _lock(entry.path)
        except OSError:
            continue
        if lock is not None:
            shutil.rmtree(entry.path, ignore_errors=True)
            os.close(lock)
    directory = tempfile.mkdtemp(dir=folder, prefix=prefix)
    return Path(directory), _lock(directory)


def _entries(folder: Path, prefix: str) -> list[os.DirEntry[str]]:
    """The directories (not links to one) in ``folder`` named as ``mkdtemp`` names them with
    ``prefix``: ``prefix`` and eight random characters (a user's own ``.haste-onnx-settings``
    is none of them)."""
    name = re.compile(re.escape(prefix) + "[a-z0-9_]{8}")
    try:
        with os.scandir(folder) as entries:
            return [
                e for e in entries if name.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []


def _lock(directory: str, wait: bool = False) -> int | None:
    """An open descriptor of ``directory`` holding its exclusive lock (waiting for it when
    ``wait``), or None when another process holds it or the file system has no such locks."""
    if fcntl is None:
        return None
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def _in_lock_order(folders: Iterable[Path]) -> list[str]:
    """Each folder once however it is spelt (a second lock on one folder would wait on the
    first for ever), in the same order in every process (two runs locking two folders in
    opposite orders would wait on each other)."""
    found: dict[tuple[int, int], str] = {}
    for folder in folders:
        try:
            info = os.stat(folder)
        except OSError:  # the move into it fails, and says why
            continue
        found.setdefault((info.st_dev, info.st_ino), str(folder))
    return [found[key] for key in sorted(found)]


class Staging:
    def __init__(self) -> None:
        self._directories: list[Path] = []
        self._locks: list[int] = []
        self._moves: list[tuple[Path, Path]] = []
        self._actions: list[Callable[[], object]] = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for directory in self._directories:
            shutil.rmtree(directory, ignore_errors=True)
        for lock in self._locks:
            os.close(lock)
        self._locks.clear()

    def write(self, destination: Path, writer: Callable[[Path], object]) -> list[Path]:
        """Call ``writer`` with the path to write ``destination`` to; any other files it writes
        beside that path (a model's .data file) go beside ``destination``. Returns the files
        staged, ``destination`` first."""
        folder = destination.parent
        try:
            directory, lock = scratch_directory(folder, ".haste-onnx-staging-")
            self._directories.append(directory)
            if lock is not None:
                self._locks.append(lock)
            writer(directory / destination.name)
        except OSError as exc:
            raise InputError(f"cannot write {destination}: {exc.strerror or exc}") from None
        others = sorted(p.name for p in directory.iterdir() if p.name != destination.name)
        names = [*others, destination.name]  # a model's data files before the model naming them
        self._moves += [(directory / name, folder / name) for name in names]
        return [folder / name for name in reversed(names)]

    def then(self, action: Callable[[], object]) -> None:
        """Do ``action`` (print what was written) once everything is in place."""
        self._actions.append(action)

    def commit(self) -> None:
        """Move every staged file into place, each by one atomic rename. If one cannot be
        moved, those moved before it are put back as they were (from hard links, or copies,
        made first), so that a failure leaves every old file and no new one; where an old file
        could not be kept (a full disk) or put back, the error says which files were replaced.
        A Ctrl-C or termination signal that arrives meanwhile takes effect once all are
        moved."""
        caught: list[int] = []
        previous = {}
        if threading.current_thread() is threading.main_thread():  # where handlers can be set
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    previous[number] = signal.signal(number, lambda n, _: caught.append(n))
        moved: list[tuple[Path, Path | str]] = []  # each destination, and its old file
        target = None
        folders: list[int | None] = []  # locked while files move in: two runs writing one model
        try:  # take turns, so that neither leaves its model with the other's .data file
            for folder in _in_lock_order(target.parent for _, target in self._moves):
                folders.append(_lock(folder, wait=True))
            for staged, target in self._moves:
                old = _keep_old(target, staged)
                _keep_mode(target, staged)
                os.replace(staged, target)
                moved.append((target, old))
        except OSError as exc:
            failed = f"cannot write {target}: {exc.strerror or exc}"
            raise InputError(f"{failed}; {self._put_back(moved)}") from None
        finally:
            for lock in folders:
                if lock is not None:
                    os.close(lock)
            self._moves.clear()
            for number, handler in previous.items():
                signal.signal(number, handler)
            for number in caught:  # now, to whatever handled it before
                signal.raise_signal(number)
        for action in self._actions:
            action()
        self._actions.clear()

    def _put_back(self, moved: list[tuple[Path, Path | str]]) -> str:
        """Undo the moves of a failed commit; says what was written."""
        left = []
        for done, old in reversed(moved):
            try:
                if old == _UNKEPT:  # the new file stays
                    left.append(str(done))
                elif old == _ABSENT:
                    done.unlink()
                else:
                    os.replace(old, done)
            except OSError:
                left.append(str(done))
                if isinstance(old, Path):  # the old file stays where it was kept
                    if old.parent.parent in self._directories:
                        self._directories.remove(old.parent.parent)
                    left[-1] += f" (the old one is {old})"
        return f"only {', '.join(left)} replaced" if left else "nothing was written"


_ABSENT, _UNKEPT = "no old file", "the old file could not be kept"


def _keep_mode(target: Path, staged: Path) -> None:
    """Give ``staged`` the permission bits of the file it replaces: restricted weights stay so."""
    try:
        os.chmod(staged, stat.S_IMODE(os.stat(target).st_mode))
    except OSError:  # no old file, or a link to none
        pass


def _keep_old(target: Path, staged: Path) -> Path | str:
    """A link to the file at ``target`` (or a copy, where the file system refuses the link),
    under its own name in a new directory beside ``staged`` (a suffix could make the longest
    names too long), to put back if the commit fails; or why there is none."""
    if not os.path.lexists(target):
        return _ABSENT
    old = Path(tempfile.mkdtemp(dir=staged.parent, prefix="old-")) / target.name
    try:
        os.link(target, old, follow_symlinks=False)
    except OSError:  # no hard links here, or not to a file of another owner
        try:
            shutil.copy2(target, old, follow_symlinks=False)
        except OSError:  # a full disk
            return _UNKEPT
    return old
