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
    """Refuse a file path (``what``: the option it comes from) that is a directory, or whose
    directory is missing or read-only: checked before any work, not found out after it."""
    if path.is_dir():
        raise InputError(f"{what} path is a directory: {path}")
    directory = path.parent
    if not directory.is_dir():
        raise InputError(f"{what} directory does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{what} directory is not writable: {directory}")


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

    def write(self, destination: Path, writer: Callable[[Path], object]) -> list[Path]:
        """Call ``writer`` with the path to write ``destination`` to; any other files it writes
        beside that path (a model's .data file) go beside ``destination``. Returns the files
        staged, ``destination`` first."""
        folder = destination.parent
        try:
            directory = Path(tempfile.mkdtemp(dir=folder, prefix=".haste-onnx-"))
            self._directories.append(directory)
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
        """Move every staged file into place. A Ctrl-C or termination signal that arrives
        meanwhile takes effect once all are moved, so that no new file is left beside an old
        one it does not belong with."""
        caught: list[int] = []
        previous = {}
        if threading.current_thread() is threading.main_thread():  # where handlers can be set
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    previous[number] = signal.signal(number, lambda n, _: caught.append(n))
        try:
            for staged, destination in self._moves:
                os.replace(staged, destination)
        except OSError as exc:
            raise InputError(f"cannot write {destination}: {exc.strerror or exc}") from None
        finally:
            self._moves.clear()
            for number, handler in previous.items():
                signal.signal(number, handler)
            for number in caught:  # now, to whatever handled it before
                signal.raise_signal(number)
        for action in self._actions:
            action()
        self._actions.clear()
