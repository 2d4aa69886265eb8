"""Entry point of the ``haste-onnx`` command."""

import click


@click.group()
@click.version_option(package_name="haste-onnx")
def main() -> None:
    """Make convolutional ONNX models cheaper with HASTE channel merging."""
