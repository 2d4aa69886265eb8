"""The ``haste-onnx`` command line: a thin click layer over the library."""

import signal
import sys


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run() -> None:
    """The console script: :func:`haste_onnx.cli.main.main`. Ctrl-C, and a SIGTERM or SIGHUP
    (which would end the process without removing its temporary files), end it with one line and
    exit 130 at any time, also while its libraries are still being imported."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)
    try:
        from haste_onnx.cli.main import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        main()
    except KeyboardInterrupt:  # between the imports and the command's own handler
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
