"""Files written whole or not at all, and several of them together: a model, its report, its plot.

Each file is written under its own name in a new temporary directory beside its destination and
moved into place by :meth:`Staging.commit`; whatever is not committed is removed on leaving the
``with`` block. A failure while writing any of them therefore leaves no file, new or partial,
and never touches an existing one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from haste_onnx.errors import InputError


class Staging:
    def __init__(self) -> None:
        self._directories: list[Path] = []
        self._moves: list[tuple[Path, Path]] = []

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

    def write(
        self, destination: Path, writer: Callable[[Path], object], beside: Sequence[str] = ()
    ) -> list[Path]:
        """Call ``writer`` with the path to write ``destination`` to; files named ``beside`` that
        it writes next to that path go next to ``destination``. Returns the files staged."""
        folder = destination.parent
        try:
            directory = Path(tempfile.mkdtemp(dir=folder, prefix=".haste-onnx-"))
            self._directories.append(directory)
            writer(directory / destination.name)
        except OSError as exc:
            raise InputError(f"cannot write {destination}: {exc.strerror or exc}") from None
        names = [*beside, destination.name]  # a model's data files before the model naming them
        self._moves += [(directory / name, folder / name) for name in names]
        return [folder / name for name in reversed(names)]

    def commit(self) -> None:
        """Move every staged file into place."""
        for staged, destination in self._moves:
            os.replace(staged, destination)
        self._moves.clear()
