"""The ``haste-onnx`` command line: a thin click layer over the library."""

import sys


def run() -> None:
    """The console script: :func:`haste_onnx.cli.main.main`, and Ctrl-C while its libraries are
    still being imported ends as it does later (one line, exit 130), not in a traceback."""
    try:
        from haste_onnx.cli.main import EXIT_INTERRUPTED, main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        main()
    except KeyboardInterrupt:  # between the imports and the command's own handler
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
