"""Exceptions that the command line maps to exit codes."""


class HasteError(Exception):
    """Base class of every error haste-onnx raises on purpose."""


class InputError(HasteError, ValueError):
    """The model, an input file, an option or an output path cannot be used (exit code 2)."""


class NothingFaster(HasteError):
    """``--only-faster`` kept no layer: none makes the model faster here (exit code 3)."""
