"""Files written whole or not at all, and several of them together: a model, its report, its plot.

Each file is written under its own name in a new temporary directory beside its destination and
moved into place by :meth:`Staging.commit`; whatever is not committed is removed on leaving the
``with`` block. A failure while writing any of them therefore leaves no file, new or partial,
and never touches an existing one.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from haste_onnx.errors import InputError


def check_writable(path: Path, what: str = "output") -> None:
    """Refuse a file path (``what``: the option it comes from) that is a directory, a device or
    a pipe (a file is written beside it and renamed over it, which would replace a device, not
    write to it), or whose directory is missing or read-only: checked before any work, not
    found out after it."""
    if not path.name:
        raise InputError(f"{what} path {str(path)!r} names no file")
    try:
        target = destination(path)
        if target.is_dir():
            raise InputError(f"{what} path is a directory: {path}")
        if target.exists() and not target.is_file():
            raise InputError(f"{what} path {path} is not a regular file (a device or a pipe)")
        directory = target.parent
        if not directory.is_dir():
            raise InputError(f"{what} directory does not exist: {directory}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InputError(f"{what} directory is not writable: {directory}")
    except OSError as exc:  # a name too long, a directory that cannot be searched
        raise InputError(f"{what} path {path}: {exc.strerror or exc}") from None


def destination(path: Path) -> Path:
    """Where writing ``path`` goes: the file a symbolic link names (which stays a link)."""
    return path.resolve() if path.is_symlink() else path


class Staging:
    def __init__(self) -> None:
        self._directories: list[Path] = []
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

    def write(self, path: Path, writer: Callable[[Path], object]) -> list[Path]:
        """Call ``writer`` with the path to write ``path`` to; any other files it writes beside
        that path (a model's .data file) go beside ``path`` (beside the file it names, if it
        is a symbolic link). Returns the files staged, that file first."""
        target = destination(path)
        folder = target.parent
        try:
            directory = Path(tempfile.mkdtemp(dir=folder, prefix=".haste-onnx-"))
            self._directories.append(directory)
            writer(directory / target.name)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        others = sorted(p.name for p in directory.iterdir() if p.name != target.name)
        names = [*others, target.name]  # a model's data files before the model naming them
        self._moves += [(directory / name, folder / name) for name in names]
        return [folder / name for name in reversed(names)]

    def then(self, action: Callable[[], object]) -> None:
        """Do ``action`` (print what was written) once everything is in place."""
        self._actions.append(action)

    def commit(self) -> None:
        """Move every staged file into place, each by one atomic rename. If one cannot be
        moved, those moved before it are put back as they were (from hard links, or copies,
        made first), so that a failure leaves every old file and no new one. A Ctrl-C or
        termination signal that arrives meanwhile takes effect once all are moved."""
        caught: list[int] = []
        previous = {}
        if threading.current_thread() is threading.main_thread():  # where handlers can be set
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    previous[number] = signal.signal(number, lambda n, _: caught.append(n))
        moved: list[tuple[Path, Path | None]] = []  # destination, and its old file's copy
        target = None
        try:
            for staged, target in self._moves:
                old = _keep_old(target, staged)
                os.replace(staged, target)
                moved.append((target, old))
        except OSError as exc:
            for done, old in reversed(moved):
                if old is None:
                    done.unlink(missing_ok=True)
                else:
                    os.replace(old, done)
            raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
        finally:
            self._moves.clear()
            for number, handler in previous.items():
                signal.signal(number, handler)
            for number in caught:  # now, to whatever handled it before
                signal.raise_signal(number)
        for action in self._actions:
            action()
        self._actions.clear()


def _keep_old(target: Path, staged: Path) -> Path | None:
    """A copy of the file at ``target``, beside ``staged`` (a hard link when the file system
    allows), to put back if the commit fails; None if there is no such file."""
    if not target.is_file():
        return None
    old = staged.with_name(staged.name + ".old")
    try:
        os.link(target, old)
    except OSError:  # no hard links here, or not to a file of another owner
        shutil.copy2(target, old)
    return old
