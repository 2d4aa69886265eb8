"""Model access in one place: loading, atomic saving, constants, names."""

from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from google.protobuf.message import EncodeError
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, set_external_data

from haste_onnx.errors import InputError
from haste_onnx.staging import Staging, check_writable, real, scratch_directory

PROTOBUF_LIMIT = 2**31 - 1
"""Models whose serialized size would exceed this must keep their tensors as external data."""


def load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load a model (with its external data), turning every failure into one clear line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as exc:  # protobuf and onnx raise many unrelated types here
        raise InputError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from None
    if not model.graph.node:
        raise InputError(f"{path} is not a readable ONNX model: its graph has no nodes")
    try:  # past 2 GB the model cannot be serialized for the checker: it reads the file then
        onnx.checker.check_model(str(path) if too_large(model) else model)
    except Exception as exc:
        raise InputError(f"{path} does not pass onnx.checker: {exc}") from None
    if model.ir_version > max_ir_version():
        import onnxruntime

        raise InputError(
            f"{path} has IR version {model.ir_version}, and onnxruntime {onnxruntime.__version__} "
            f"reads up to {max_ir_version()}: export it with ir_version {max_ir_version()} or "
            "lower (a newer onnx package stamps its own IR version on the models it makes)"
        )
    return model


def inline_functions(model: onnx.ModelProto, path: str | os.PathLike[str]) -> onnx.ModelProto:
    """``model`` with its local functions inlined (their nodes in the graph that calls them),
    each inlined node named after its call, ``/layer1/layer1.0/BasicBlock/Conv_16``. Past 2 GB
    the inliner cannot take the model, which then keeps them."""
    if not model.functions or too_large(model):
        return model
    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:
        raise InputError(f"{path}: its local functions cannot be inlined ({exc})") from None
    functions = local_functions(model)
    expanded = [pair for node in model.graph.node for pair in function_nodes(functions, node)]
    if [leaf.op_type for leaf, _ in expanded] == [node.op_type for node in inlined.graph.node]:
        names = {n.name for n, (_, call) in zip(inlined.graph.node, expanded) if not call}
        for node, (leaf, call) in zip(inlined.graph.node, expanded):
            if call:
                node.name = unique_name(names, f"{call}/{leaf.name or leaf.op_type}")
    return inlined


def local_functions(model: onnx.ModelProto) -> dict[tuple[str, str], onnx.FunctionProto]:
    """``model``'s local functions by (domain, name), as a node that calls one names it."""
    return {(f.domain, f.name): f for f in model.functions}


def function_nodes(
    functions: dict[tuple[str, str], onnx.FunctionProto], node: onnx.NodeProto, call: str = ""
) -> Iterator[tuple[onnx.NodeProto, str]]:
    """The nodes ``node`` stands for once ``functions`` are inlined, in order, each with the path
    of the calls it sits in ("" for ``node`` itself when it calls no function)."""
    body = functions.get((node.domain, node.op_type))
    if body is None:
        yield node, call
        return
    here = f"{call}/{node.name or node.op_type}" if call else node.name or node.op_type
    for inner in body.node:
        yield from function_nodes(functions, inner, here)


@functools.cache
def max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads: tried on a one-node model, from
    the newest this onnx package knows down (onnxruntime has no call that tells it)."""
    import onnxruntime

    tensor = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "probe", tensor[:1], tensor[1:])
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a refused version is expected here: no log line
    for version in range(onnx.IR_VERSION, 3, -1):
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        probe.ir_version = version
        try:
            onnxruntime.InferenceSession(
                probe.SerializeToString(), options, ["CPUExecutionProvider"]
            )
        except Exception:  # onnxruntime's own exception types, whatever the version
            continue
        return version
    return 3


def external_data_files(path: str | os.PathLike[str]) -> set[Path]:
    """The files (resolved) in which the model file keeps tensors, read without the data; none
    for a file that is not a model (:func:`load` says why)."""
    if not Path(path).is_file():  # a pipe would be waited on, a device read for ever
        return set()
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # protobuf and onnx raise many unrelated types here
        return set()
    return {
        real(Path(path).parent / ExternalDataInfo(t).location)
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


def too_large(model: onnx.ModelProto) -> bool:
    """Whether the model cannot be serialized as one protobuf (2 GB limit)."""
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except EncodeError:  # so far past the limit that protobuf cannot even size it
        return True


def save(model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool) -> list[Path]:
    """Write ``model`` to ``path`` whole or not at all (:func:`stage`); returns the files."""
    with Staging() as staging:
        written = stage(model, path, external_data, staging)
        staging.commit()
    return written


def stage(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_data: bool, staging: Staging
) -> list[Path]:
    """Stage ``model`` for ``path``; its tensors go to ``<name>.data`` when asked or needed.
    Returns the files it will write."""
    path = Path(path)
    check_writable(path)
    external = external_data or too_large(model)
    return staging.write(
        path, lambda staged: _save(model, staged, staged.name + ".data" if external else None)
    )


def _save(model: onnx.ModelProto, path: Path, data_name: str | None) -> None:
    """Save ``model`` to ``path``, with its tensors of 1 KB or more in ``data_name`` beside it
    when that is given (onnx's own option checks whether that name exists in the current
    directory, not beside ``path``). The model is not changed."""
    if data_name is None:
        onnx.save_model(model, path)
        return
    model = copy.deepcopy(model)
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):  # external data is raw data
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) >= 1024:
            set_external_data(tensor, data_name)
    try:
        onnx.save_model(model, path)  # writes the tensors marked external into data_name
    except onnx.checker.ValidationError as exc:  # its own word for a data file it cannot open
        raise OSError(str(exc)) from None
    data = path.parent / data_name
    if data.is_file():  # onnx creates it readable by its owner only; share it as the model is
        try:
            data.chmod(stat.S_IMODE(path.stat().st_mode))
        except OSError:  # a file system without permission bits: the file is as good
            pass


def session_source(model: onnx.ModelProto) -> bytes | str:
    """What onnxruntime should load: the serialized model, or, past the protobuf limit, a file
    with external data in a temporary directory that lives as long as the process."""
    if not too_large(model):
        return model.SerializeToString()
    directory, lock = scratch_directory(Path(tempfile.gettempdir()), "haste-onnx-session-")
    _SESSION_DIRS.append((directory, lock))
    path = directory / "model.onnx"
    _save(model, path, "model.onnx.data")
    return str(path)


_SESSION_DIRS: list[tuple[Path, int | None]] = []


@atexit.register
def _remove_session_dirs() -> None:
    for directory, lock in _SESSION_DIRS:
        shutil.rmtree(directory, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: the graph's inputs that are not initializers."""
    constants = initializers(model.graph)
    return [i for i in model.graph.input if i.name not in constants]


def constant_value(graph: onnx.GraphProto, name: str, links: int = 16) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or the output of a Constant node, or of
    an Identity of one (PyTorch's exporter shares equal parameters through Identity nodes)."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or name not in node.output:
            continue
        if node.op_type == "Identity" and links > 0:
            return constant_value(graph, node.input[0], links - 1)
        if node.op_type == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name == "sparse_value":
                return _dense(attr.sparse_tensor)
            return np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.float32)
    return None


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse tensor's dense value (indices linear, [NNZ], or coordinates, [NNZ, rank])."""
    values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices)
    dense = np.zeros(list(sparse.dims), values.dtype)
    if indices.ndim == 1:
        dense.flat[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def graph_output_names(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}


def with_outputs(
    model: onnx.ModelProto, names: Iterable[str], skip: Iterable[str] = ()
) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the float tensors ``names`` (those not already
    graph outputs nor in ``skip``), to capture intermediate values in one run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = graph_output_names(probe.graph) | set(skip)
    for name in dict.fromkeys(names):
        if name not in present:
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    return probe


SHAPE_CONSTANT_LIMIT = 1024
"""Elements of the largest initializer whose values shape inference is shown (Reshape targets,
Slice bounds and the like are far smaller; weights, larger, are shown by type and shape)."""


def shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference, without its weights and without any value a
    feed can override: an initializer also listed as a graph input stays an input of unknown
    value, and a large one becomes an input of its type and shape (a 1-D one of unknown length:
    it is data, not a shape, and onnx's data propagation expands a 1-D tensor's length element
    by element, 24 GB for 600 M)."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    constants, typed = [], []
    for tensor in graph.initializer:
        if tensor.name in inputs:
            continue
        if int(np.prod(tensor.dims)) <= SHAPE_CONSTANT_LIMIT:
            constants.append(tensor)
        else:
            dims = ["length"] if len(tensor.dims) == 1 else tensor.dims
            typed.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, dims))
    skeleton = onnx.helper.make_graph(
        graph.node,
        graph.name,
        [*graph.input, *typed],
        graph.output,
        constants,
        value_info=graph.value_info,
        sparse_initializer=graph.sparse_initializer,
    )
    return onnx.helper.make_model(
        skeleton,
        ir_version=model.ir_version,
        opset_imports=model.opset_import,
        functions=model.functions,
    )


def declare_float_outputs(
    graph: onnx.GraphProto, names: Iterable[str], source: onnx.ModelProto
) -> None:
    """Give the tensors ``names`` (outputs of the operator's nodes in ``graph``) a value_info:
    float32, with the shape onnx's shape inference finds for them in ``source`` (the original
    model) from its constants, where it finds one. onnx has no schema for a custom operator:
    without them, shape inference types nothing after it, and the tools built on it
    (quantization, onnx.utils.extract_model) fail on the converted model."""
    declared = {v.name for v in [*graph.input, *graph.value_info, *graph.output]}
    missing = [name for name in dict.fromkeys(names) if name not in declared]
    if not missing:
        return
    inferred: dict[str, onnx.ValueInfoProto] = {}
    try:
        found = onnx.shape_inference.infer_shapes(shapes_only(source)).graph
        inferred = {v.name: v for v in found.value_info}
    except (onnx.shape_inference.InferenceError, ValueError):
        pass  # the type alone, below
    for name in missing:
        value = inferred.get(name)
        if value is None or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        graph.value_info.append(value)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs ``node`` holds: the branches of an If, the body of a Loop or Scan."""
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else a.graphs)]


def reads(node: onnx.NodeProto) -> list[str]:
    """The tensors ``node`` reads: its inputs, and every name read inside its subgraphs, which
    may come from the outer graph."""
    names = list(node.input)
    for graph in subgraphs(node):
        for inner in graph.node:
            names.extend(reads(inner))
        names.extend(o.name for o in graph.output)
    return names


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name that ``graph`` and its subgraphs declare, define or read: a new
    tensor's name must be none of them."""
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    names |= {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        names |= {*node.input, *node.output}
        for inner in subgraphs(node):
            names |= tensor_names(inner)
    return names


def nested_op_types(graph: onnx.GraphProto) -> set[str]:
    """The op types of the nodes inside the subgraphs of ``graph``'s nodes, at any depth."""
    return set().union(*map(inner_op_types, graph.node))


def function_op_types(
    functions: dict[tuple[str, str], onnx.FunctionProto], node: onnx.NodeProto
) -> set[str]:
    """The op types inside ``node``'s body when it calls one of the local ``functions`` (which
    stay in a model too large to inline them), at any depth."""
    return {leaf.op_type for leaf, call in function_nodes(functions, node) if call}


def inner_op_types(node: onnx.NodeProto) -> set[str]:
    """The op types of the nodes inside ``node``'s subgraphs, at any depth."""
    types: set[str] = set()
    for inner in subgraphs(node):
        types |= {n.op_type for n in inner.node} | nested_op_types(inner)
    return types


def remove_unused_initializers(graph: onnx.GraphProto, keep: Iterable[str] = ()) -> None:
    used = {name for node in graph.node for name in reads(node)}
    used |= graph_output_names(graph) | set(keep)
    for index in reversed(range(len(graph.initializer))):  # in place: a copy of a tensor past
        if graph.initializer[index].name not in used:  # 2 GB is serialized, which fails
            del graph.initializer[index]


def dead_outputs(graph: onnx.GraphProto) -> set[str]:
    """Outputs of nodes whose every output is unused (transitively)."""
    live = graph_output_names(graph)
    dead: set[str] = set()
    for node in reversed(graph.node):
        if any(o in live for o in node.output):
            live.update(reads(node))
        else:
            dead.update(o for o in node.output if o)
    return dead


def remove_newly_dead_nodes(graph: onnx.GraphProto, dead_before: set[str]) -> None:
    """Remove nodes that a rewrite left without any use (e.g. the Constant of a replaced weight),
    keeping nodes that were already unused before it."""
    dead = dead_outputs(graph) - dead_before
    kept = [n for n in graph.node if not any(o in dead for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)


def sync_initializer_inputs(graph: onnx.GraphProto, former: set[str], list_new: bool) -> None:
    """Keep graph inputs in step with the initializers: drop the inputs that named ``former``
    initializers now gone (listed as inputs, they were overridable defaults), and with
    ``list_new`` (IR < 4 requires it) list the new initializers as inputs."""
    names = [t.name for t in graph.initializer]
    kept = [i for i in graph.input if i.name not in former or i.name in names]
    listed = {i.name for i in kept}
    del graph.input[:]
    graph.input.extend(kept)
    if list_new:
        graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in graph.initializer
            if t.name not in listed
        )


def unique_name(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default
