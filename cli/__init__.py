"""The ``haste-onnx`` command line: a thin click layer over the library."""

import signal
import sys

_received: list[int] = []  # the signals _interrupt has taken


def _interrupt(number: int, _frame: object) -> None:
    _received.append(number)
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a signal came that ``run`` turns into KeyboardInterrupt. Python runs a handler
    wherever the main thread is, a finalizer or a callback included, where it drops the
    exception: the command checks this before it writes its files, so that the signal still
    ends it."""
    return bool(_received)


def honored() -> None:
    """Called where KeyboardInterrupt ends the command: the signals taken so far are dealt with
    (a command run again in the same process, as tests do, starts with none)."""
    _received.clear()


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
            for number in held:
                signal.signal(number, _interrupt)
            from haste_onnx.cli.main import main
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, inherited)  # one that came meanwhile: now
        main()
    except KeyboardInterrupt:
        honored()
        if sys.stderr is not None:  # started without one, print would write on stdout
            try:
                print("error: interrupted", file=sys.stderr)
            except OSError:
                pass
        sys.exit(130)
