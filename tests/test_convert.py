"""End-to-end conversion through the Python API."""

import os
import stat
import tempfile
import time
from pathlib import Path

import graphs
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import haste_onnx
from haste_onnx import flops, opdef, report, runtime
from haste_onnx.errors import InputError
from haste_onnx.passes.fold import fold_batchnorm, fold_constant_inputs
from haste_onnx.passes.rewrite import HasteOptions, decide, rewrite
from haste_onnx.pipeline import VerifyOptions, convert, inspect, verify_pair
from haste_onnx.reference import HasteConv
from haste_onnx.runtime import make_session
from haste_onnx.verify import OutputFidelity, Tolerances, _output_failures, compare

EXAMPLE = Path(__file__).parent.parent / "models" / "example.onnx"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def save(model: onnx.ModelProto, tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def by_name(result, name):
    return next(d for d in result.decisions if d.name == name)


def test_example_model_converts_verifies_and_runs(tmp_path):
    out = tmp_path / "example.haste.onnx"
    result = convert(EXAMPLE, out)
    assert result.passed, result.verification.failures
    assert result.written == [out]
    assert [p.name for p in result.layers] == ["layer1", "block.conv1", "block.conv2", "layer2"]
    assert "3 input channels" in by_name(result, "stem").reason
    assert "stride [2, 2]" in by_name(result, "down").reason
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(EXAMPLE)
    assert model.ir_version == original.ir_version
    assert {(o.domain, o.version) for o in model.opset_import} == {
        ("", 17),
        (opdef.DOMAIN, opdef.OPSET_VERSION),
    }
    assert model.graph.input == original.graph.input
    assert model.graph.output == original.graph.output
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (y_cpp,) = make_session(str(out)).run(None, {"input": x})
    (y_ref,) = ReferenceEvaluator(model, new_ops=[HasteConv]).run(None, {"input": x})
    np.testing.assert_allclose(y_cpp, y_ref, rtol=1e-4, atol=1e-4)
    (y_orig,) = ort.InferenceSession(str(EXAMPLE)).run(None, {"input": x})
    cos = float(np.sum(y_orig * y_cpp) / np.linalg.norm(y_orig) / np.linalg.norm(y_cpp))
    assert 0.95 < cos < 1.0 - 1e-7  # close, but really approximated
    report = result.flops
    assert 0.0 < report.mean_ratio < 1.0
    assert report.haste_total < report.baseline_total
    assert all(layer.kernel_mismatch == 0.0 for layer in result.verification.layers)


def test_a_kernel_that_disagrees_with_the_reference_fails_verification(tmp_path, monkeypatch):
    import haste_onnx.verify

    reference = haste_onnx.verify.haste_conv

    def skewed(*args, **kwargs):  # as if the C++ kernel were off by 0.1 %
        y, stats = reference(*args, **kwargs)
        return y * np.float32(1.001), stats

    monkeypatch.setattr(haste_onnx.verify, "haste_conv", skewed)
    result = convert(EXAMPLE, tmp_path / "out.onnx")
    assert not result.passed and not (tmp_path / "out.onnx").exists()
    assert any(
        "the C++ kernel and the numpy reference disagree" in f for f in result.verification.failures
    )


def test_resnet_like_folds_bn_fuses_relu_and_keeps_strided_convs(tmp_path):
    src = save(graphs.resnet_like(), tmp_path)
    result = convert(src, tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    plans = {p.name: p for p in result.layers}
    assert set(plans) == {
        "block0.conv1",
        "block0.conv2",
        "block1.conv1",
        "block1.conv2",
        "down.conv2",
    }
    assert plans["block0.conv1"].fused_batchnorm and plans["block0.conv1"].fused_relu
    assert plans["block0.conv2"].fused_batchnorm and not plans["block0.conv2"].fused_relu
    for name in ("down.conv1", "down.shortcut"):
        assert "stride [2, 2]" in by_name(result, name).reason
    model = onnx.load(tmp_path / "out.onnx")
    types = [n.op_type for n in model.graph.node]
    assert types.count("HasteConv") == 5 and types.count("Conv") == 3
    assert types.count("BatchNormalization") == 3  # stem and the two strided convs keep theirs
    names = {n.name for n in model.graph.node if n.op_type == "HasteConv"}
    assert names == set(plans)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "N"  # dynamic batch survives
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    assert make_session(str(tmp_path / "out.onnx")).run(None, {"x": x})[0].shape == (5, 10)


def test_projection_shortcuts_are_left_alone_unless_included(tmp_path):
    src = save(graphs.bottleneck_like(), tmp_path)
    result = convert(src, tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    converted = {d.name for d in result.decisions if d.converted}
    convs = ("conv1", "conv2", "conv3")
    assert converted == {f"block{i}.{c}" for i in (0, 1) for c in convs} | {"squeeze"}
    for name in ("block0.shortcut", "block1.shortcut"):
        assert "1x1 projection shortcut" in by_name(result, name).reason
    forced = convert(src, tmp_path / "forced.onnx", HasteOptions(include=("block1.shortcut",)))
    assert {d.name for d in forced.decisions if d.converted} == converted | {"block1.shortcut"}
    fpn = convert(save(graphs.fpn_like(), tmp_path), tmp_path / "fpn.onnx")  # not a shortcut
    assert {d.name for d in fpn.decisions if d.converted} == {"lateral4", "lateral3", "smooth"}


def test_shape_inference_types_every_tensor_after_a_hasteconv(tmp_path):
    """onnx knows no schema for HasteConv: the converter declares its outputs, so that shape
    inference (and quantization or extract_model, built on it) still types the whole graph."""
    original = graphs.resnet_like()
    assert not original.graph.value_info  # as exported: nothing declared but inputs and outputs
    convert(save(original, tmp_path), tmp_path / "out.onnx")
    converted = onnx.load(tmp_path / "out.onnx")

    def inferred(model: onnx.ModelProto) -> dict[str, str]:
        graph = onnx.shape_inference.infer_shapes(model).graph
        return {v.name: str(v.type) for v in graph.value_info}

    before, after = inferred(original), inferred(converted)
    outputs = {o.name for o in converted.graph.output}
    kept = {o for n in converted.graph.node for o in n.output} - outputs
    assert kept <= set(after)  # every tensor of the converted graph is typed, as before
    assert {name: after[name] for name in kept} == {name: before[name] for name in kept}


def test_no_shape_is_declared_from_a_value_a_feed_can_override(tmp_path):
    """The Conv's size comes from an initializer that is also a graph input: declared from its
    default value, onnxruntime folded the Shape after the HasteConv and reshaped wrongly."""
    src = save(graphs.overridable_shape(), tmp_path)
    feeds = {
        "x": np.random.default_rng(0).standard_normal((2, 4096)).astype(np.float32),
        "target": np.array([-1, 16, 32, 8], np.int64),
    }
    np.savez(tmp_path / "feeds.npz", **feeds)
    result = convert(
        src, tmp_path / "out.onnx", verify_options=VerifyOptions(tmp_path / "feeds.npz")
    )
    assert result.passed and [p.name for p in result.layers] == ["conv"]
    (want,) = ort.InferenceSession(str(src)).run(None, feeds)
    (got,) = make_session(tmp_path / "out.onnx").run(None, feeds)
    assert got.shape == want.shape == (2, 16, 32, 8)


def test_vgg_like_converts_every_conv_after_the_stem(tmp_path):
    result = convert(save(graphs.vgg_like(), tmp_path), tmp_path / "out.onnx")
    assert result.passed
    assert [p.name for p in result.layers] == ["features.1", "features.3", "features.4"]


def test_auto_pad_becomes_explicit_pads(tmp_path):
    result = convert(save(graphs.auto_padded(), tmp_path), tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    nodes = onnx.load(tmp_path / "out.onnx").graph.node
    pads = {n.name: helper.get_node_attr_value(n, "pads") for n in nodes}
    assert pads == {"same_upper": [2] * 4, "same_lower": [1] * 4, "valid": [0] * 4}


def test_a_conv_among_odd_neighbours_is_converted_and_the_model_kept_whole(tmp_path):
    """A scalar first input, a graph input with the name the new weight would take, and a
    BatchNormalization that does not fold (it is left as it is)."""
    result = convert(save(graphs.odd_neighbours(), tmp_path), tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    assert result.verification.batch == 2  # x's: the scalar has none
    assert [(p.name, p.fused_batchnorm) for p in result.layers] == [("c", False)]
    graph = onnx.load(tmp_path / "out.onnx").graph
    assert [n.op_type for n in graph.node] == ["Mul", "HasteConv", "BatchNormalization", "Add"]
    assert not {i.name for i in graph.input} & {t.name for t in graph.initializer}


def test_depthwise_conv_is_skipped_with_its_group(tmp_path):
    result = convert(save(graphs.depthwise(), tmp_path), tmp_path / "out.onnx")
    assert by_name(result, "dw").reason == "group 16 (grouped or depthwise convolution)"
    assert [p.name for p in result.layers] == ["pw"]


def test_constant_node_and_constant_subgraph_weights_are_folded(tmp_path):
    result = convert(save(graphs.constant_node_weights(), tmp_path), tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    assert [p.name for p in result.layers] == ["from_constant", "from_subgraph"]
    types = [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node]
    assert "ConstantOfShape" not in types and "Constant" not in types  # folded away


@pytest.mark.parametrize("sign", [1, -1])
def test_tensors_read_inside_subgraphs_are_kept(tmp_path, sign):
    """The Conv's output, its weight and a Constant are read in an If's branches: the Relu is not
    fused, nothing is removed, and both branches give the original's outputs."""
    src = save(graphs.subgraph_reads(), tmp_path)
    x = sign * np.abs(np.random.default_rng(0).standard_normal((2, 16, 8, 8), np.float32))
    np.save(tmp_path / "x.npy", x)
    result = convert(src, tmp_path / "out.onnx", verify_options=VerifyOptions(tmp_path / "x.npy"))
    assert result.passed, result.verification.failures
    assert [(p.name, p.fused_relu) for p in result.layers] == [("conv", False)]
    assert result.flops.nested == ["Conv inside If 'if'"]  # said, not silently left out
    original = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    expected = original.run(None, {"x": x})[0]
    got = make_session(tmp_path / "out.onnx").run(None, {"x": x})[0]
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.95


def test_initializers_listed_as_inputs_are_converted(tmp_path):
    """Graph inputs that name initializers (overridable defaults) go with the initializers a
    conversion replaces: the converted model needs the same feeds as the original."""
    src = save(graphs.initializers_as_inputs(), tmp_path)
    result = convert(src, tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    assert [p.name for p in result.layers] == ["features.1", "features.3", "features.4"]
    converted = onnx.load(tmp_path / "out.onnx")
    initializers = {t.name for t in converted.graph.initializer}
    assert all(i.name in initializers for i in converted.graph.input[1:])
    assert converted.graph.input[0].name == "x"


def test_unnamed_convs_keep_their_names_from_convert_to_verify(tmp_path):
    model = graphs.vgg_like()
    for node in model.graph.node:
        node.name = ""
    model.graph.node[0].name = "Conv_3(features.1.y)"  # the stem, named as an unnamed one would be
    src = save(model, tmp_path)
    converted = convert(src, tmp_path / "out.onnx")
    checked = verify_pair(src, tmp_path / "out.onnx")
    assert [p.name for p in checked.layers] == [p.name for p in converted.layers]
    assert [p.name for p in converted.layers] == [
        "Conv_3(features.1.y)_1",
        "Conv_7(features.3.y)",
        "Conv_10(features.4.y)",
    ]
    assert checked.flops.baseline_total == converted.flops.baseline_total
    assert checked.flops.haste_total == pytest.approx(converted.flops.haste_total)
    assert [s.name for s in checked.flops.skipped] == [s.name for s in converted.flops.skipped]


def _edited_conversion(tmp_path: Path, edit) -> tuple[Path, Path]:
    """vgg_like and its conversion, whose first HasteConv node ``edit(model, node)`` changed."""
    src = save(graphs.vgg_like(), tmp_path)
    assert convert(src, tmp_path / "out.onnx").passed
    model = onnx.load(tmp_path / "out.onnx")
    edit(model, next(n for n in model.graph.node if n.op_type == opdef.OP_TYPE))
    return src, save(model, tmp_path, "edited.onnx")


def _as_constant_nodes(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    for name in node.input[1:]:
        (tensor,) = [t for t in model.graph.initializer if t.name == name]
        model.graph.initializer.remove(tensor)
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], value=tensor))


def test_verify_reads_a_layer_whose_weights_are_constant_nodes(tmp_path):
    src, edited = _edited_conversion(tmp_path, _as_constant_nodes)
    checked = verify_pair(src, edited)
    assert checked.passed, checked.verification.failures
    assert [p.name for p in checked.layers] == ["features.1", "features.3", "features.4"]
    assert len(checked.verification.layers) == 3


def _set_initializer(index: int, value: np.ndarray):
    def edit(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
        (tensor,) = [t for t in model.graph.initializer if t.name == node.input[index]]
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))

    return edit


def _set_attribute(name: str, value: object):
    def edit(_model: onnx.ModelProto, node: onnx.NodeProto) -> None:
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])

    return edit


def _drop_bias_slot(_model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    del node.input[2]


def _computed_bias(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    model.graph.node.insert(0, helper.make_node("Neg", [node.input[2]], ["negated"]))
    node.input[2] = "negated"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_initializer(1, np.ones((8, 8), np.float32)), "has W of shape [8, 8]"),
        (_set_initializer(1, np.ones((8, 8, 3, 1), np.float32)), "has W of shape [8, 8, 3, 1]"),
        (_set_initializer(3, np.ones(25, np.float32)), "and planes of shape [25]"),
        (_set_attribute("pads", "1"), "has pads '1', where they are four integers"),
        (_set_attribute("pads", [1, 1]), "has pads [1, 1]"),
        (_set_attribute("tile", [3]), "has tile [3], where it is a positive integer"),
        (_set_attribute("tile", 0), "has tile 0"),
        (_set_attribute("activation", "Sigmoid"), "has activation 'Sigmoid'"),
        (_drop_bias_slot, "has 3 inputs and 1 outputs"),
        (_computed_bias, "reads W, B or planes from something other than a constant"),
    ],
)
def test_verify_refuses_a_converted_model_edited_out_of_shape(tmp_path, edit, message):
    src, edited = _edited_conversion(tmp_path, edit)
    with pytest.raises(InputError, match="HasteConv 'features.1' ") as error:
        verify_pair(src, edited)
    assert message in str(error.value)


def test_a_converted_model_says_where_its_operator_comes_from(tmp_path):
    model = graphs.vgg_like()
    onnx.helper.set_model_props(model, {"author": "someone"})
    assert convert(save(model, tmp_path), tmp_path / "out.onnx").passed
    props = {p.key: p.value for p in onnx.load(tmp_path / "out.onnx").metadata_props}
    assert props["author"] == "someone"  # the model's own metadata stays
    assert "register_custom_ops_library(haste_onnx.get_library_path())" in props["haste_onnx"]


def test_sparse_constant_weights_are_read(tmp_path):
    result = convert(save(graphs.sparse_constant_weights(), tmp_path), tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    assert [p.name for p in result.layers] == ["conv0", "conv1"]


def test_convs_sharing_a_weight_share_it_converted(tmp_path):
    result = convert(save(graphs.shared_weight(), tmp_path), tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    nodes = onnx.load(tmp_path / "out.onnx").graph.node
    assert [n.op_type for n in nodes] == ["HasteConv", "HasteConv"]
    assert nodes[0].input[1] == nodes[1].input[1] and nodes[0].input[2] == nodes[1].input[2]
    assert nodes[0].input[3] != nodes[1].input[3]  # each layer its own planes


def test_weight_computed_from_the_input_is_refused_with_its_reason(tmp_path):
    src = save(graphs.runtime_weight(), tmp_path)
    with pytest.raises(InputError, match="dynamic: weight is computed at run time"):
        convert(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_same_input_and_seed_give_byte_identical_files(tmp_path):
    convert(EXAMPLE, tmp_path / "a.onnx")
    convert(EXAMPLE, tmp_path / "b.onnx")
    convert(EXAMPLE, tmp_path / "c.onnx", HasteOptions(seed=1))
    a, b, c = ((tmp_path / f"{n}.onnx").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_external_data_models_load_and_save(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(
        onnx.load(EXAMPLE),
        src,
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    result = convert(src, tmp_path / "out.onnx")
    assert result.passed
    assert result.written == [tmp_path / "out.onnx", tmp_path / "out.onnx.data"]
    model = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert make_session(str(tmp_path / "out.onnx")).run(None, {"input": x})[0].shape == (1, 10)
    modes = [stat.S_IMODE(p.stat().st_mode) for p in result.written]
    assert modes[1] == modes[0]  # whoever may read the model may read its weights


def test_a_file_system_without_permission_bits_still_gets_the_data_file(tmp_path, monkeypatch):
    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(EXAMPLE), src, save_as_external_data=True, location="ext.onnx.data")
    monkeypatch.setattr(Path, "chmod", refuse)
    result = convert(src, tmp_path / "out.onnx")
    assert result.passed and (tmp_path / "out.onnx.data").is_file()


def test_external_data_is_written_beside_the_output_whatever_the_current_directory(
    tmp_path, monkeypatch
):
    """Converted again into the same place (the usual re-run), and with a file of the data
    file's name in the current directory: both are written as asked; and a model whose tensors
    are all small is written without a data file."""
    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(EXAMPLE), src, save_as_external_data=True, size_threshold=0)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "out.onnx.data").write_text("not ours")
    monkeypatch.chdir(tmp_path / "elsewhere")
    for _ in range(2):
        written = convert(src, tmp_path / "out.onnx").written
        assert written == [tmp_path / "out.onnx", tmp_path / "out.onnx.data"]
    assert (tmp_path / "elsewhere" / "out.onnx.data").read_text() == "not ours"
    monkeypatch.chdir(tmp_path)
    assert convert(src, "out.onnx").written == [Path("out.onnx"), Path("out.onnx.data")]
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert make_session(str(tmp_path / "out.onnx")).run(None, {"input": x})[0].shape == (1, 10)
    small = tmp_path / "tiny.onnx"
    onnx.save(graphs.tiny(), small, save_as_external_data=True, size_threshold=0)
    out = tmp_path / "tiny.haste.onnx"
    assert convert(small, out, HasteOptions(num_planes=4)).written == [out]  # 400-byte planes


def test_fidelity_failure_writes_nothing_unless_forced(tmp_path):
    strict = Tolerances(min_cosine=0.9999999)
    out = tmp_path / "out.onnx"
    result = convert(EXAMPLE, out, tolerances=strict)
    assert not result.passed and result.written == [] and not out.exists()
    assert "would pass" in result.verification.failures[0]
    forced = convert(EXAMPLE, out, tolerances=strict, force=True)
    assert not forced.passed and forced.written == [out] and out.exists()


def test_an_output_sized_by_the_values_fails_verification_by_name(tmp_path):
    """NonZero after a threshold finds other hits once the layers are converted: its output
    cannot be compared element by element, which is a failure that names it, not a crash."""
    src = save(graphs.value_sized_output(), tmp_path)
    out = tmp_path / "out.onnx"
    result = convert(src, out, HasteOptions(num_planes=2, min_channels=1, skip_first=0))
    shapes = [f for f in result.verification.failures if "cannot be compared" in f]
    assert len(shapes) == 1 and "nonzero" in shapes[0] and "[4, " in shapes[0], shapes
    assert [o.name for o in result.verification.outputs] == ["reducesum8"]
    assert not result.passed and result.written == [] and not out.exists()
    forced = convert(src, out, HasteOptions(num_planes=2, min_channels=1, skip_first=0), force=True)
    assert forced.written == [out] and out.exists()


def test_convs_inside_local_functions_are_converted_and_counted(tmp_path):
    """Local functions (model.functions) are inlined when the model is loaded: before, their
    Convs were neither converted nor counted, and nothing said so."""
    src = save(graphs.local_functions(), tmp_path)
    inspection = inspect(src)
    names = [d.name for d in inspection.decisions]
    assert names == ["stem", "block1/Conv", "block2/Conv"] and not inspection.flops.uncounted
    conv = 2 * 8 * 8 * 9 * 16 * 16
    assert inspection.flops.baseline_total == 3 * conv
    result = convert(src, tmp_path / "out.onnx", HasteOptions(min_channels=1))
    assert result.passed and len(result.layers) == 2, result.verification.failures
    assert not onnx.load(tmp_path / "out.onnx").functions


def test_convs_in_functions_past_2_gb_are_reported_as_not_converted(tmp_path, monkeypatch):
    """Past 2 GB the inliner cannot take a model, whose functions then stay: their Convs are
    listed as neither converted nor counted, not dropped without a word."""
    src = save(graphs.local_functions(), tmp_path)
    monkeypatch.setattr(haste_onnx.ir, "too_large", lambda model: True)
    nested = inspect(src).flops.nested
    assert nested == ["Conv inside Block 'block1'", "Conv inside Block 'block2'"], nested
    only = save(graphs.local_functions(stem=False), tmp_path, "only.onnx")
    with pytest.raises(InputError, match="the Convs of its local functions are not converted"):
        convert(only, write=False)


def test_a_dequantized_weight_is_refused_as_quantized():
    """A QDQ model's weight, DequantizeLinear(int8 initializer): constant, but a quantized Conv
    that a float32 HasteConv would replace; before, it read "computed at run time"."""
    n = graphs.Net(23, channels=16, size=8)
    q = np.round(n.weight(16, 16, 3) * 100).astype(np.int8)
    n.inits.append(numpy_helper.from_array(q, "wq"))
    w = n.op("DequantizeLinear", "wq", n.const(np.array(0.01)))
    n.nodes.append(helper.make_node("Conv", ["x", w], ["y"], name="qconv", pads=[1, 1, 1, 1]))
    (decision,) = decide(n.model("y", ["N", 16, 8, 8]), HasteOptions(min_channels=1))[1]
    assert not decision.converted and "dequantized at run time" in decision.reason, decision


def test_existing_output_is_untouched_when_conversion_fails(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    convert(EXAMPLE, out, tolerances=Tolerances(min_cosine=0.9999999))
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_user_inputs_drive_the_verification(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = convert(EXAMPLE, tmp_path / "o.onnx", verify_options=VerifyOptions(tmp_path / "x.npy"))
    assert result.verification.batch == 4
    assert "x.npy" in result.flops.inputs


def test_policy_options(tmp_path):
    out = tmp_path / "o.onnx"
    skip = convert(EXAMPLE, out, HasteOptions(skip_first=1, exclude=("layer2",)))
    assert [p.name for p in skip.layers] == ["block.conv1", "block.conv2"]
    assert "first 1 eligible" in by_name(skip, "layer1").reason
    assert by_name(skip, "layer2").reason == "excluded by the user"
    forced = convert(EXAMPLE, out, HasteOptions(include=("stem",), layer_planes={"layer1": 30}))
    assert forced.layers[0].name == "stem"
    assert {p.name: p.num_planes for p in forced.layers}["layer1"] == 30
    with pytest.raises(InputError, match="no Conv named nope"):
        convert(EXAMPLE, out, HasteOptions(exclude=("nope",)))


def test_inspect_lists_every_conv_with_baseline_flops():
    result = inspect(EXAMPLE)
    assert [d.converted for d in result.decisions] == [False, True, True, True, True, False]
    # stem: 2 * 32*32 * 9 * 3 * 32; layer1: 2 * 32*32 * 9 * 32 * 64; 3 more 3x3 64->64 and 1x1;
    # the strided conv: 2 * 16*16 * 9 * 64 * 64; Gemm: 2 * 64 * 10
    expected = (
        2 * 1024 * 9 * (3 * 32 + 32 * 64 + 2 * 64 * 64)
        + 2 * 1024 * 64 * 64
        + 2 * 256 * 9 * 64 * 64
        + 2 * 64 * 10
    )
    assert result.flops.baseline_total == expected


def test_dense_gaussian_projections_cost_a_multiply_add_per_entry(tmp_path):
    """Appendix B.1: a Gaussian plane's dot product takes 2·P² FLOPs; a sparse plane's
    additions take one per non-zero entry."""
    src = save(graphs.tiny(), tmp_path)
    n_p, c, patch = 2 * 2, 8, 5 * 5  # 6x6 outputs in 3x3 tiles
    for sparsity, expected in ((None, 2 * n_p * c * 14 * patch), (0.0, n_p * c * 14 * patch)):
        result = convert(src, tmp_path / "out.onnx", HasteOptions(sparsity=sparsity))
        assert [layer.flops.hashing for layer in result.flops.layers] == [expected]


def test_flops_terms_match_the_paper_formulas():
    f = flops.haste_flops(
        in_channels=64,
        out_channels=128,
        kernel=3,
        out_h=8,
        out_w=7,
        tile=3,
        projection_flops=100,
        ratio=0.5,
        merging=4.0,
    )
    n_p = 3 * 3  # ceil(8/3) * ceil(7/3) tiles
    assert f.baseline == 2 * 8 * 7 * 9 * 64 * 128
    assert f.centering == 2 * n_p * 64 * 25
    assert f.hashing == n_p * 64 * 100
    assert f.merge_inputs == n_p * 25 * (64 * 0.5 + 4)
    assert f.merge_filters == n_p * 128 * 64 * 0.5 * 9
    assert f.reduced_conv == 2 * 8 * 7 * 9 * 64 * 0.5 * 128
    assert f.reduction == pytest.approx(
        1
        - (f.centering + f.hashing + f.merge_inputs + f.merge_filters + f.reduced_conv) / f.baseline
    )


@pytest.mark.parametrize("name", ["light_resnet50.onnx", "light_vgg19.onnx"])
def test_onnx_light_model_zoo_topologies(tmp_path, name):
    result = convert(LIGHT / name, tmp_path / "out.onnx", verify_options=VerifyOptions(batch=1))
    assert result.passed, result.verification.failures
    assert len(result.layers) >= (40 if "resnet" in name else 14)
    assert all(layer.kernel_mismatch <= 1e-3 for layer in result.verification.layers)
    assert haste_onnx.__version__


def test_models_past_the_protobuf_limit_go_through_files(tmp_path, monkeypatch):
    """The 2 GB path, exercised by lowering the limit: sessions load from a file with external
    data and the output is saved with external data, even for an input without it. Those
    files live in a temporary directory as long as the process; one left by a process killed
    outright goes with the next run."""
    from haste_onnx import ir

    monkeypatch.setattr(ir, "PROTOBUF_LIMIT", 100_000)  # the example is ~550 kB
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    killed = tmp_path / "tmp" / "haste-onnx-session-killed_1"
    killed.mkdir(parents=True)
    an_hour_ago = time.time() - 3600
    os.utime(killed, (an_hour_ago, an_hour_ago))
    result = convert(EXAMPLE, tmp_path / "big.onnx")
    assert result.passed
    assert not killed.exists()
    sessions = list((tmp_path / "tmp").iterdir())
    assert sessions and all((d / "model.onnx.data").is_file() for d in sessions)
    assert result.written == [tmp_path / "big.onnx", tmp_path / "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 100_000
    x = np.ones((1, 3, 32, 32), np.float32)
    assert make_session(str(tmp_path / "big.onnx")).run(None, {"input": x})[0].shape == (1, 10)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HasteOptions(num_planes=99), "99 is out of range"),
        (lambda: HasteOptions(layer_planes={"conv1": 70}), "layer 'conv1'"),
        (lambda: HasteOptions(sparsity=float("nan")), "sparsity"),
        (lambda: HasteOptions(tile=100000), "tile"),
        (lambda: HasteOptions(tile=2.5), "tile = 2.5 must be an integer"),
        (lambda: HasteOptions(seed=-1), "seed = -1 must be >= 0"),
        (lambda: HasteOptions(seed=0.5), "seed = 0.5 must be an integer"),
        (lambda: HasteOptions(include="layer1"), "include takes a sequence of Conv names"),
        (
            lambda: convert(EXAMPLE, options=HasteOptions(layer_planes={"nope": 4}), write=False),
            "layer planes: no Conv named nope",
        ),
        (
            lambda: convert(EXAMPLE, options=HasteOptions(layer_planes={"stem": 4}), write=False),
            r"layer planes: stem is not converted \(only 3 input channels",
        ),
        (lambda: Tolerances(min_cosine=float("nan")), "min_cosine = nan"),
        (lambda: Tolerances(min_top1=1.5), "min_top1"),
        (lambda: VerifyOptions(batch=-1), "batch = -1"),
        (lambda: VerifyOptions(dims={"N": 0}), "N = 0"),
        (lambda: convert(EXAMPLE, only_faster=True, threads=0), "threads = 0"),
    ],
)
def test_bad_options_raise_input_error(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_an_output_spelled_differently_from_the_input_is_refused(tmp_path):
    src = save(onnx.load(EXAMPLE), tmp_path, "ok.onnx")
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="output path is the input model"):
        convert(src, tmp_path / "sub" / ".." / "ok.onnx")
    assert src.read_bytes() == before


def test_mean_ratio_is_weighted_by_baseline_flops():
    def layer(name: str, ratio: float, c: int) -> report.LayerReport:
        counts = flops.haste_flops(
            in_channels=c,
            out_channels=c,
            kernel=3,
            out_h=8,
            out_w=8,
            tile=3,
            projection_flops=10,
            ratio=ratio,
            merging=1.0,
        )
        return report.LayerReport(name, c, c, 3, 8, 8, 14, 3, ratio, 1.0, counts, True, False)

    flops_report = report.FlopsReport("x", [layer("a", 0.2, 16), layer("b", 0.6, 32)], [], 0.0, [])
    assert flops_report.mean_ratio == pytest.approx((0.2 * 256 + 0.6 * 1024) / 1280)


def test_batchnorm_folding_uses_the_node_epsilon():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    params = [rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4)]
    names = ["scale", "shift", "mean", "var"]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(params, names)]
    graph = helper.make_graph([], "g", [], [], inits)
    bn = helper.make_node("BatchNormalization", ["y", *names], ["z"], epsilon=0.5)
    folded_w, folded_b = fold_batchnorm(w, b, bn, graph)
    scale, shift, mean, var = (p.astype(np.float64) for p in params)
    factor = scale / np.sqrt(var + 0.5)
    np.testing.assert_allclose(folded_w, w * factor[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(folded_b, (b - mean) * factor + shift, rtol=1e-6, atol=1e-7)


def test_relu_is_not_fused_when_the_conv_output_is_a_graph_output(tmp_path):
    n = graphs.Net(0, channels=16, size=8)
    y = n.conv("x", 16, 16, name="conv")
    model = n.model(n.op("Relu", y), ["N", 16, 8, 8])
    model.graph.output.append(
        helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["N", 16, 8, 8])
    )
    result = convert(save(model, tmp_path), tmp_path / "out.onnx")
    assert result.passed and [(p.name, p.fused_relu) for p in result.layers] == [("conv", False)]


def test_a_layers_planes_do_not_depend_on_which_others_are_converted(tmp_path):
    def planes(path: Path, name: str) -> np.ndarray:
        model = onnx.load(path)
        node = next(n for n in model.graph.node if n.name == name)
        return next(
            numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[3]
        )

    convert(EXAMPLE, tmp_path / "all.onnx")
    convert(EXAMPLE, tmp_path / "part.onnx", HasteOptions(exclude=("layer1",)))
    np.testing.assert_array_equal(
        planes(tmp_path / "all.onnx", "block.conv1"), planes(tmp_path / "part.onnx", "block.conv1")
    )


@pytest.fixture(scope="module")
def example_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "out.onnx"
    return convert(EXAMPLE, out, write=False)


def test_top1_only_for_classification_outputs_and_labels():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10))
    flipped = logits.copy()
    flipped[:2] *= -1  # two rows whose argmax changes
    assert compare("logits", logits, flipped).top1 == pytest.approx(0.75)
    maps = rng.standard_normal((2, 16, 4, 4))
    assert compare("features", maps, maps[:, ::-1]).top1 is None  # [N, C, H, W]: no classes
    single = rng.standard_normal((4, 1))
    assert compare("score", single, -single).top1 is None  # [N, 1]: a score, not classes
    labels = maps.argmax(axis=1)  # [N, H, W] labels, as a segmentation model's ArgMax gives
    other = labels.copy()
    other[0, 0, :3] += 1
    assert compare("labels", labels, other).top1 == pytest.approx(1 - 3 / 32)
    assert compare("mask", labels > 5, other > 5).top1 == np.mean((labels > 5) == (other > 5))


def test_unchanged_flops_are_the_skipped_convs_and_the_gemm(example_result):
    totals = report.flops_json(example_result.flops)["totals"]
    # skipped: stem 2*32*32*9*3*32, down 2*16*16*9*64*64; Gemm 2*64*10
    unchanged = 2 * 1024 * 9 * 3 * 32 + 2 * 256 * 9 * 64 * 64 + 2 * 64 * 10
    assert totals["unchanged_flops"] == unchanged
    assert totals["baseline_flops"] == totals["converted_baseline_flops"] + unchanged
    assert totals["haste_flops"] == totals["converted_haste_flops"] + unchanged


def test_table_totals_are_the_whole_model(example_result):
    flops = example_result.flops
    (line,) = [ln for ln in report.table(flops).splitlines() if ln.startswith("converted layers:")]
    assert line.startswith(f"converted layers: {report._human(flops.converted_baseline)} -> ")
    assert f"whole model (Conv, Gemm, MatMul): {report._human(flops.baseline_total)} -> " in line
    assert f"-> {report._human(flops.haste_total)} (" in line


def test_skip_first_counts_only_convs_the_policy_would_convert():
    """Projection shortcuts are never eligible: they do not use up --skip-first."""
    _, decisions = decide(graphs.bottleneck_like(), HasteOptions(skip_first=4))
    reasons = {d.name: d.reason for d in decisions}
    assert "projection shortcut" in reasons["block0.shortcut"]
    skipped = [d.name for d in decisions if "skip_first" in d.reason]
    assert skipped == ["block0.conv1", "block0.conv2", "block0.conv3", "squeeze"]


def test_fold_constant_inputs_leaves_out_graph_inputs_and_computed_tensors() -> None:
    """A Conv weight that is a graph input (no initializer) is neither constant nor computed
    by a node: fold_constant_inputs leaves it out (as it does a tensor computed from X) and
    returns the folded value of a constant subgraph; rewrite then keeps that Conv as Conv."""
    rng = np.random.default_rng(45)
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["X", "W1"], ["A"], name="input_weight", kernel_shape=[3, 3], pads=[1] * 4
        ),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Mul", ["w2", "two"], ["W2"]),
        helper.make_node(
            "Conv", ["A", "W2"], ["B"], name="folded", kernel_shape=[3, 3], pads=[1] * 4
        ),
        helper.make_node("ReduceMean", ["B"], ["W3"], axes=[0, 2, 3], keepdims=1),
        helper.make_node("Conv", ["B", "W3"], ["Y"], name="from_x", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 8, 8, 8]),
            helper.make_tensor_value_info("W1", onnx.TensorProto.FLOAT, [8, 8, 3, 3]),
        ],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    folded = fold_constant_inputs(model, {"W1", "W2", "W3"})
    assert set(folded) == {"W2"}
    np.testing.assert_array_equal(folded["W2"], 2 * w2)
    converted, decisions, plans = rewrite(model, HasteOptions())
    assert [p.name for p in plans] == ["folded"], decisions


def test_a_data_file_onnx_cannot_open_is_an_input_error(tmp_path, monkeypatch):
    """onnx reports a data file it cannot open as a checker.ValidationError: it must come out as
    the one-line 'cannot write' InputError, and no file is left (here the data file's name,
    <output>.data, is longer than a file name may be). For an input with a data file the output
    has one too, and its name is refused before any work."""
    from haste_onnx import ir

    src = tmp_path / "ext.onnx"
    onnx.save(onnx.load(EXAMPLE), src, save_as_external_data=True, location="ext.onnx.data")
    out = tmp_path / ("a" * 248 + ".onnx")  # a legal name; its .data, 258 characters, is not
    with pytest.raises(InputError, match="the output's data file path .*: File name too long"):
        convert(src, out)
    monkeypatch.setattr(ir, "PROTOBUF_LIMIT", 100_000)  # found to need one only when saving
    with pytest.raises(InputError, match="cannot write"):
        convert(EXAMPLE, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_min_top1_fails_just_below_and_suggests_a_bound_that_passes():
    """top-1 agreement 2/3: --min-top1 0.6667 fails, and the bound its message suggests (rounded
    down, 0.6666) passes; 2/3 itself passes."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 10))
    flipped = logits.copy()
    flipped[:1] *= -1  # one row of three whose argmax changes
    result = compare("logits", logits, flipped)
    assert result.top1 == pytest.approx(2 / 3)
    failures = _output_failures([result], Tolerances(min_cosine=None, min_top1=0.6667))
    assert len(failures) == 1 and "(--min-top1 0.6666 would pass)" in failures[0], failures
    assert _output_failures([result], Tolerances(min_cosine=None, min_top1=0.6666)) == []
    assert _output_failures([result], Tolerances(min_cosine=None, min_top1=2 / 3)) == []


def test_the_suggested_min_cosine_passes_what_failed():
    """A cosine of 0.94996 fails --min-cosine 0.95; the bound the message suggests is rounded
    down (0.9499), so that it passes, not to the nearest (0.95), which fails again."""
    result = OutputFidelity("y", max_abs=0.1, rel_l2=0.3, cosine=0.94996, top1=None)
    failures = _output_failures([result], Tolerances(min_cosine=0.95))
    assert len(failures) == 1 and "(--min-cosine 0.9499 would pass)" in failures[0], failures
    assert _output_failures([result], Tolerances(min_cosine=0.9499)) == []


def test_runs_take_the_batches_of_a_fixed_first_dimension_one_at_a_time():
    model = graphs.tiny()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    session = runtime.quiet_session(model, custom_ops=False)
    x = np.random.default_rng(0).standard_normal((3, 8, 6, 6)).astype(np.float32)
    (y,) = runtime.run(session, None, {"x": x})
    one_by_one = [session.run(None, {"x": x[i : i + 1]})[0] for i in range(3)]
    np.testing.assert_array_equal(y, np.concatenate(one_by_one))
    with pytest.raises(Exception, match="invalid dimensions"):  # onnxruntime still checks sizes
        runtime.run(session, None, {"x": x[:, :4]})


def test_batches_whose_outputs_differ_in_size_are_refused_with_a_reason():
    """A fixed batch of one, fed two images: an output sized by the values (NonZero) has
    another size for each, and cannot be joined on its first axis."""
    model = graphs.value_sized_output()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    session = runtime.quiet_session(model, custom_ops=False)
    x = np.random.default_rng(0).standard_normal((2, 16, 12, 12)).astype(np.float32)
    with pytest.raises(InputError, match="output 'nonzero7' has another size in each batch"):
        runtime.run(session, ["nonzero7"], {"x": x})


def test_runs_cut_every_image_input_and_feed_the_others_whole():
    """A fixed-batch image input beside a dynamic-batch one: both are cut (the dynamic one was
    fed whole to every run, 4 x 4 rows); a [1] input goes whole to every run."""
    x = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Mul", ["s", "k"], ["y"])],
        "mixed",
        [
            x("a", onnx.TensorProto.FLOAT, [1, 2, 3, 3]),
            x("b", onnx.TensorProto.FLOAT, ["N", 2, 3, 3]),
            x("k", onnx.TensorProto.FLOAT, [1]),
        ],
        [x("y", onnx.TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = graphs.IR_VERSION
    session = runtime.quiet_session(model, custom_ops=False)
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((4, 2, 3, 3)).astype(np.float32) for _ in range(2))
    k = np.array([3.0], np.float32)
    (y,) = runtime.run(session, None, {"a": a, "b": b, "k": k})
    np.testing.assert_allclose(y, (a + b) * 3.0, rtol=1e-6)
    with pytest.raises(InputError, match="not every image input holds a multiple of 4 images"):
        runtime.run(session, None, {"a": a, "b": b[:3], "k": k})


def test_convs_on_a_one_pixel_map_are_left_as_conv():
    """A squeeze-and-excitation block's 1x1 Convs run on the 1x1 map of a global pooling: a
    patch there is one pixel and padding, and hashing it costs more than the Conv."""
    model = graphs.squeeze_excitation()
    _, decisions = decide(model, HasteOptions())
    reasons = {d.name: d.reason for d in decisions}
    assert reasons["conv"] == ""
    for name in ("squeeze", "expand"):
        assert "its input is a 1x1 map (a global pooling's, or a small input's)" in reasons[name]
    _, decisions = decide(model, HasteOptions(include=("expand",)))  # a policy: --include wins
    assert [d.name for d in decisions if d.converted] == ["conv", "expand"]


def test_a_bias_built_from_the_input_s_type_is_folded(tmp_path):
    """PyTorch's unoptimized export builds every bias from CastLike(0, input): constant, as
    CastLike reads only the input's type. Before, every Conv was 'bias is computed at run time'."""
    model = graphs.cast_like_bias()
    (site,), (decision,) = decide(model, HasteOptions(min_channels=1))
    assert decision.converted, decision.reason
    np.testing.assert_array_equal(site.bias, np.zeros(8, np.float32))
    onnx.save(model, tmp_path / "m.onnx")
    result = convert(tmp_path / "m.onnx", options=HasteOptions(min_channels=1), write=False)
    assert result.passed and [p.name for p in result.layers] == ["conv"]


def test_batchnorm_parameters_shared_through_identity_nodes_are_folded(tmp_path):
    """PyTorch's exporter (without constant folding) shares equal parameters through Identity
    nodes: the BatchNormalizations were left unfolded and their Relus unfused, without a word."""
    model = graphs.resnet_like()
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        for i in range(1, 5):
            shared = f"{node.input[i]}.shared"
            graph.node.insert(0, helper.make_node("Identity", [node.input[i]], [shared]))
            node.input[i] = shared
    result = convert(save(model, tmp_path), tmp_path / "out.onnx")
    assert result.passed, result.verification.failures
    plans = {p.name: p for p in result.layers}
    assert plans["block0.conv1"].fused_batchnorm and plans["block0.conv1"].fused_relu
    types = [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node]
    assert types.count("BatchNormalization") == 3  # stem and the two strided convs keep theirs


def test_shapes_from_a_run_give_nothing_for_inputs_that_are_not_tensors():
    """A sequence input: no zeros to make for it (a KeyError traceback from inspect before)."""
    model = graphs.shape_inference_blind()
    floats = helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)
    model.graph.input.append(helper.make_value_info("seq", helper.make_sequence_type_proto(floats)))
    shapes = flops.static_shapes(model, {"x": (2, 8, 6, 6)})
    assert "first.y" in shapes and "second.y" not in shapes
