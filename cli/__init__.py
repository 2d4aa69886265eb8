"""The ``haste-onnx`` command line: a thin click layer over the library."""

import signal
import sys


def _interrupt(_signal: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run() -> None:
    """The console script: :func:`haste_onnx.cli.main.main`. Ctrl-C, and a SIGTERM or SIGHUP
    (which would end the process without removing its temporary files), end it with one line and
    exit 130 at any time, also while its libraries are still being imported: those signals are
    held back until the imports are done (a library interrupted in its own start-up code can
    fail in any way, even crash), and taken then."""
    held = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    inherited = signal.pthread_sigmask(signal.SIG_BLOCK, held)  # and threads started meanwhile
    try:
        try:
            for number in held - {signal.SIGINT}:  # SIGINT raises KeyboardInterrupt already
                signal.signal(number, _interrupt)
            from haste_onnx.cli.main import main
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, inherited)  # one that came meanwhile: now
        main()
    except KeyboardInterrupt:
        if sys.stderr is not None:  # started without one, print would write on stdout
            try:
                print("error: interrupted", file=sys.stderr)
            except OSError:
                pass
        sys.exit(130)
