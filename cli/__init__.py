"""The ``haste-onnx`` command line: a thin click layer over the library."""
