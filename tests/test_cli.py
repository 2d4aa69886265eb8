"""The ``haste-onnx`` command: outputs, exit codes, and one clear line for every bad input."""

import builtins
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from haste_onnx.cli.main import main
from onnx import helper

from haste_onnx import cli, inputs, pipeline, report, staging
from haste_onnx.errors import InputError
from haste_onnx.inputs import user_feeds

EXAMPLE = Path(__file__).parent.parent / "models" / "example.onnx"


@pytest.fixture(autouse=True)
def _no_signal_taken(monkeypatch):
    """Each test starts as a new process would, with no signal taken by the command's handler
    (which an earlier test's cli.run() left installed in this process)."""
    monkeypatch.setattr(cli, "_received", [])


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "example.onnx"
    shutil.copy(EXAMPLE, path)
    return path


def test_convert_prints_report_and_writes_next_to_the_model(example, tmp_path):
    proc = subprocess.run(["haste-onnx", "convert", str(example)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "example.haste.onnx").is_file()
    for text in ("layer1", "block.conv2", "stride [2, 2] (downsampling)", "cosine", "fewer"):
        assert text in proc.stdout
    assert "Traceback" not in proc.stderr
    # FLOPs saved are not time saved: the last line says so, and where to look
    assert "fewer FLOPs is not less time" in proc.stdout.splitlines()[-1]
    assert "--only-faster" in proc.stdout.splitlines()[-1]
    assert "C++ kernel vs numpy reference: 4 layers," in proc.stdout
    excluded = [a for name in ("layer1", "block.conv1", "block.conv2") for a in ("--exclude", name)]
    code, out, err = run("convert", example, "-o", tmp_path / "one.onnx", *excluded)
    assert code == 0 and "C++ kernel vs numpy reference: 1 layer," in out, err


def test_json_to_stdout_is_the_documented_schema(example, tmp_path):
    code, out, err = run(
        "convert", example, "--json", "-", "-L", "20", "--plot", tmp_path / "plot.png"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "haste-onnx/report/1"
    assert doc["passed"] is True and doc["options"]["num_planes"] == 20
    assert [layer["name"] for layer in doc["layers"]] == [
        "layer1",
        "block.conv1",
        "block.conv2",
        "layer2",
    ]
    layer = doc["layers"][0]
    assert set(layer["flops"]) == {
        "baseline",
        "centering",
        "hashing",
        "merge_inputs",
        "merge_filters",
        "reduced_conv",
        "total",
        "reduction",
    }
    assert {s["name"]: s["reason"] for s in doc["skipped"]}["down"].startswith("stride")
    totals = doc["totals"]
    assert totals["haste_flops"] < totals["baseline_flops"]
    assert "seeded random" in doc["inputs"]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "FLOPs per image" in err  # the table moves to stderr when stdout carries JSON


def test_quiet_prints_nothing_on_success(example):
    code, out, err = run("convert", example, "-q")
    assert code == 0 and out == "" and err == ""


def test_fidelity_failure_exits_1_and_writes_the_report_not_the_model(example, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = run("convert", example, "--min-cosine", "0.9999999", "--json", report)
    assert code == 1
    assert "fidelity check failed" in err and "would pass" in err and "model is not written" in err
    assert not (tmp_path / "example.haste.onnx").exists()
    doc = json.loads(report.read_text())
    assert doc["passed"] is False and doc["output"] == []
    code, _, err = run("convert", example, "--min-cosine", "0.9999999", "--force", "-q")
    assert code == 1 and (tmp_path / "example.haste.onnx").exists()


def test_inputs_the_original_overflows_on_are_named_as_the_cause(example, tmp_path):
    """Past float32's range the original gives infinities: that is the failure, not a kernel
    that disagrees with the reference where both overflow the same way, nor numpy warnings."""
    np.save(tmp_path / "huge.npy", np.full((1, 3, 32, 32), 3e38, np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run("convert", example, "--inputs", tmp_path / "huge.npy", "-q")
    assert code == 1 and not caught
    assert err.startswith(
        "error: fidelity check failed: the original model's output 'logits' has NaN or "
        "infinite values on these inputs"
    )
    assert "disagree" not in err and len(err.splitlines()) == 1
    code, out, _ = run("convert", example, "--inputs", tmp_path / "huge.npy", "--json", "-")
    fidelity = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert code == 1 and fidelity["fidelity"][0]["max_abs"] is None


def test_inspect_lists_convs_without_converting(example, tmp_path):
    code, out, _ = run("inspect", example)
    assert code == 0
    assert "stem" in out and "skip: only 3 input channels" in out and "convert" in out
    assert "4 of 6 convs eligible" in out
    assert not (tmp_path / "example.haste.onnx").exists()


def test_inspect_refuses_input_sizes_the_model_cannot_run_at(tmp_path):
    """A 3x3 Conv without padding on a 2x2 input: shape inference gives its output 0x0, and
    -1x-1 on 1x1."""
    model = graphs.input_smaller_than_kernel()
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], "hw"):
        dim.dim_param = name
    onnx.save(model, tmp_path / "small.onnx")
    for size, output in ((2, "0x0"), (1, "-1x-1")):
        sizes = ["--dim", f"h={size}", "--dim", f"w={size}"]
        code, out, err = run("inspect", tmp_path / "small.onnx", *sizes)
        assert code == 2 and out == ""
        assert f"Conv 'conv' cannot run at these input sizes: its output would be {output}" in err


def test_inspect_names_the_convs_inside_subgraphs_it_leaves_out(tmp_path):
    onnx.save(graphs.subgraph_reads(), tmp_path / "if.onnx")
    code, out, err = run("inspect", tmp_path / "if.onnx", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "1 of 1 convs eligible" in out
    assert out.splitlines()[-1] == "neither converted nor counted: Conv inside If 'if'"
    assert json.loads((tmp_path / "r.json").read_text())["nested"] == ["Conv inside If 'if'"]


def test_flops_per_image_are_divided_by_the_batch_of_the_image_input(tmp_path):
    """Not by the largest first dimension of any input (anchors [1000, 4] here: 1000x too few)."""
    onnx.save(graphs.with_anchors(), tmp_path / "anchors.onnx")
    conv = 2 * 6 * 6 * 9 * 8 * 2  # 2 Ho Wo K^2 C M
    for command in ("inspect", "convert"):
        code, out, err = run(command, tmp_path / "anchors.onnx", "--batch", "2", "--json", "-")
        assert code == 0, err
        totals = json.loads(out)
        totals = totals.get("totals", totals)
        assert totals["baseline_flops"] == conv, command


def test_flops_shape_inference_cannot_follow_are_counted_from_a_run(tmp_path):
    """Every size is fixed, but inference loses the second Conv's shapes: before, inspect left
    it out ('?') and asked for --dim sizes the model does not have."""
    onnx.save(graphs.shape_inference_blind(), tmp_path / "blind.onnx")
    code, out, err = run("inspect", tmp_path / "blind.onnx", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["uncounted"] == [] and report["baseline_flops"] == 2 * 2 * 6 * 6 * 9 * 8 * 8


def test_shapes_a_run_cannot_give_are_explained_and_taken_from_the_user_s_inputs(tmp_path):
    """A model that fails on zeros (an integer divisor): inspect asked for --dim sizes the
    model does not have; with --inputs it now runs on them."""
    model = graphs.shape_inference_blind()
    graph = model.graph
    reshape = next(n for n in graph.node if n.op_type == "Reshape")
    graph.node.insert(0, helper.make_node("Div", ["ones", "d"], ["q"]))
    at = list(graph.node).index(reshape)
    graph.node.insert(at, helper.make_node("Mul", [reshape.input[1], "q"], ["shape2"]))
    graph.node[at + 1].input[1] = "shape2"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "ones"))
    graph.input.append(helper.make_tensor_value_info("d", onnx.TensorProto.INT64, [1]))
    onnx.save(model, tmp_path / "div.onnx")
    code, out, err = run("inspect", tmp_path / "div.onnx")
    assert code == 0, err
    assert "a run of the model on zeros failed" in out and "--dim" not in out
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, d=np.array([1], np.int64))
    code, out, err = run(
        "inspect", tmp_path / "div.onnx", "--inputs", tmp_path / "in.npz", "--json", "-"
    )
    assert code == 0 and json.loads(out)["uncounted"] == [], err


def test_inspect_says_when_a_weight_is_computed_at_run_time(tmp_path):
    onnx.save(graphs.runtime_weight(), tmp_path / "dynamic.onnx")
    code, out, err = run("inspect", tmp_path / "dynamic.onnx")
    assert code == 0, err
    assert "weight unknown" in out and "weight is computed at run time" in out
    assert "None" not in out


def test_verify_checks_an_existing_pair(example, tmp_path):
    assert run("convert", example, "-q")[0] == 0
    code, out, err = run("verify", example, tmp_path / "example.haste.onnx", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["passed"] is True
    code, _, err = run("verify", example, example)
    assert code == 2 and "no HasteConv node" in err
    other = EXAMPLE.parent / "fashion" / "vgg_fashion.onnx"  # another model: [N, 1, 28, 28] in
    code, _, err = run("verify", other, tmp_path / "example.haste.onnx")
    assert code == 2 and "is not a conversion of" in err and "Nx1x28x28" in err


def test_user_inputs_npz_and_dynamic_dims(tmp_path):
    model = graphs.vgg_like()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, _, err = run("convert", src)
    assert code == 2 and "dynamic dimension 'H'" in err and "--dim H=" in err
    assert run("convert", src, "--dim", "H=12", "--dim", "W=20", "-q")[0] == 0
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = run("convert", src, "--inputs", tmp_path / "in.npz", "--json", "-", "-q")
    assert code == 0, err
    assert "user inputs" in json.loads(out)["inputs"]


def test_a_model_exported_for_one_image_is_checked_on_several(tmp_path):
    """A fixed batch of 1 (torch's default export) with 3 images: run one at a time, not refused;
    FLOPs per image as for one."""
    model = graphs.tiny()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "one.onnx")
    x = np.random.default_rng(0).standard_normal((3, 8, 6, 6)).astype(np.float32)
    np.save(tmp_path / "three.npy", x)
    inputs = ["--inputs", tmp_path / "three.npy"]
    code, out, err = run("convert", tmp_path / "one.onnx", *inputs, "--json", "-", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert "x [3, 8, 6, 6]" in report["inputs"]
    assert report["totals"]["baseline_flops"] == 2 * 6 * 6 * 9 * 8 * 2
    code, _, err = run("verify", tmp_path / "one.onnx", tmp_path / "one.haste.onnx", *inputs)
    assert code == 0, err
    np.save(tmp_path / "bad.npy", x[:, :4])
    code, _, err = run("convert", tmp_path / "one.onnx", "--inputs", tmp_path / "bad.npy")
    assert code == 2 and "[3, 4, 6, 6] does not fit the model's [1, 8, 6, 6]" in err
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, tmp_path / "two.onnx")
    code, _, err = run("convert", tmp_path / "two.onnx", *inputs)
    assert code == 2 and "exported for a batch of 2, it takes a multiple of 2 images" in err


def test_a_fixed_first_dimension_is_a_batch_only_for_image_inputs(tmp_path):
    """[C, H, W] without a batch axis: 2 x C channels are not two batches, and FLOPs are not
    divided by C."""
    model = graphs.tiny()
    x = model.graph.input[0].type.tensor_type.shape
    del x.dim[0]  # [8, 6, 6]
    model.graph.node.insert(0, helper.make_node("Unsqueeze", ["chw", "axes"], ["x"]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0]), "axes"))
    model.graph.input[0].name = "chw"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, tmp_path / "chw.onnx")
    np.save(tmp_path / "double.npy", np.zeros((16, 6, 6), np.float32))
    code, _, err = run("convert", tmp_path / "chw.onnx", "--inputs", tmp_path / "double.npy")
    assert code == 2 and "[16, 6, 6] does not fit the model's [8, 6, 6]" in err, err
    code, out, err = run("inspect", tmp_path / "chw.onnx", "--json", "-")
    assert code == 0 and json.loads(out)["baseline_flops"] == 2 * 6 * 6 * 9 * 8 * 2, err


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[object], str]]:
    (tmp_path / "text.onnx").write_text("this is not a model")
    full = EXAMPLE.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(full[: len(full) // 2])
    onnx.save(graphs.no_conv(), tmp_path / "noconv.onnx")
    onnx.save(graphs.conv_only_in_subgraph(), tmp_path / "subgraph.onnx")
    onnx.save(graphs.input_smaller_than_kernel(), tmp_path / "small.onnx")
    onnx.save(graphs.runtime_weight(), tmp_path / "dynamic.onnx")
    shutil.copy(EXAMPLE, tmp_path / "ok.onnx")
    np.save(tmp_path / "int.npy", np.zeros((1, 3, 32, 32), np.int64))
    np.save(tmp_path / "nan.npy", np.full((1, 3, 32, 32), np.nan, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 32, 32), np.float32))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_text("not a PNG")
    (tmp_path / "no images").mkdir()
    (tmp_path / "q.onnx.data").mkdir()
    (tmp_path / "zero.npy").write_bytes(b"")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    broken = onnx.load(EXAMPLE)
    broken.graph.node[0].input[1] = "missing"
    onnx.save(broken, tmp_path / "broken.onnx")
    external = onnx.load(EXAMPLE)
    onnx.save(external, tmp_path / "ext.onnx", save_as_external_data=True, location="b.onnx.data")
    return {
        "missing file": ([tmp_path / "nope.onnx"], "model file not found"),
        "not onnx": ([tmp_path / "text.onnx"], "not a readable ONNX model"),
        "truncated": ([tmp_path / "truncated.onnx"], "not a readable ONNX model"),
        "fails onnx.checker": ([tmp_path / "broken.onnx"], "does not pass onnx.checker"),
        "no conv": ([tmp_path / "noconv.onnx"], "has no Conv node"),
        "conv in subgraph": ([tmp_path / "subgraph.onnx"], "Convs inside the subgraphs of If"),
        "all ineligible": ([tmp_path / "dynamic.onnx"], "dynamic: weight is computed at run time"),
        "output is input": (
            [tmp_path / "ok.onnx", "-o", tmp_path / "ok.onnx"],
            "output path is the input model",
        ),
        "missing output dir": (
            [tmp_path / "ok.onnx", "-o", tmp_path / "no" / "o.onnx"],
            "output directory does not exist",
        ),
        "unwritable output": (
            [tmp_path / "ok.onnx", "-o", "/proc/haste.onnx"],
            "output path /proc/haste.onnx is not a file in a folder",
        ),
        "missing json dir": (
            [tmp_path / "ok.onnx", "--json", tmp_path / "no" / "r.json"],
            "--json directory does not exist",
        ),
        "missing plot dir": (
            [tmp_path / "ok.onnx", "--plot", tmp_path / "no" / "p.png"],
            "--plot directory does not exist",
        ),
        "unknown dim": ([tmp_path / "ok.onnx", "--dim", "btach=4"], "no input of the model"),
        "negative seed": ([tmp_path / "ok.onnx", "--seed", "-1"], "'--seed': -1 is not in"),
        "int inputs": ([tmp_path / "ok.onnx", "--inputs", tmp_path / "int.npy"], "of int64"),
        "nan inputs": ([tmp_path / "ok.onnx", "--inputs", tmp_path / "nan.npy"], "NaN"),
        "empty inputs": ([tmp_path / "ok.onnx", "--inputs", tmp_path / "empty.npy"], "is empty"),
        "corrupt image": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "images"],
            "cannot read image",
        ),
        "plot to stdout": ([tmp_path / "ok.onnx", "--plot", "-"], "--plot -: name a .png file"),
        "model to stdout": ([tmp_path / "ok.onnx", "-o", "-"], "cannot be written to stdout"),
        "output data is a directory": (
            [tmp_path / "ext.onnx", "-o", tmp_path / "q.onnx"],
            "the output's data file path is a directory: " + str(tmp_path / "q.onnx.data"),
        ),
        "empty image folder": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "no images", "--mean", "128"],
            "error: no images (",  # not blamed on --mean
        ),
        "mean without images": (
            [tmp_path / "ok.onnx", "--mean", "128"],
            "--mean and --std scale an image folder given as --inputs",
        ),
        "mean for arrays": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "nan.npy", "--std", "2"],
            "--mean and --std scale image folders; arrays are used as they are",
        ),
        "output is the input's data": (
            [tmp_path / "ext.onnx", "-o", tmp_path / "b.onnx.data"],
            "holds the input model's tensors",
        ),
        "output is the inputs": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "nan.npy", "-o", tmp_path / "nan.npy"],
            "output path is the --inputs file",
        ),
        "output name too long": (
            [tmp_path / "ok.onnx", "-o", tmp_path / ("x" * 300 + ".onnx")],
            "File name too long",
        ),
        "bad L": ([tmp_path / "ok.onnx", "-L", "64"], "64"),
        "bad s": ([tmp_path / "ok.onnx", "-s", "1.5"], "outside [0, 1)"),
        "bad fraction s": ([tmp_path / "ok.onnx", "-s", "1/2/3"], "a fraction like 2/3"),
        "nan bound": ([tmp_path / "ok.onnx", "--min-cosine", "nan"], "nan is not a number"),
        "bound out of range": ([tmp_path / "ok.onnx", "--min-top1", "2"], "2.0 is not in"),
        "plot format": (
            [tmp_path / "ok.onnx", "--plot", tmp_path / "r.xyz"],
            "--plot " + str(tmp_path / "r.xyz") + ": name a .png file",
        ),
        "output directory path": (
            [tmp_path / "ok.onnx", "-o", f"{tmp_path}/newdir/"],
            "names a directory; give a file name",
        ),
        "included and excluded": (
            [tmp_path / "ok.onnx", "--include", "layer1", "--exclude", "layer1"],
            "layer1: both included and excluded",
        ),
        "unknown layer": ([tmp_path / "ok.onnx", "--exclude", "nope"], "no Conv named nope"),
        "include ineligible": (
            [tmp_path / "ok.onnx", "--include", "down"],
            "include: down cannot be converted: stride [2, 2] (downsampling)",
        ),
        "bad layer L": ([tmp_path / "ok.onnx", "--layer-planes", "layer1=99"], "layer1"),
        "missing inputs": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "x.npy"],
            "inputs not found",
        ),
        "zero-byte inputs": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "zero.npy"],
            "cannot read inputs",
        ),
        "corrupt npz": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "corrupt.npz"],
            "cannot read inputs",
        ),
        "json is input": (
            [tmp_path / "ok.onnx", "--json", tmp_path / "ok.onnx"],
            "--json " + str(tmp_path / "ok.onnx") + " would overwrite the model",
        ),
        "plot is input": (
            [tmp_path / "ok.onnx", "--plot", tmp_path / "ok.onnx"],
            "would overwrite the model",
        ),
        "json is output": (
            [tmp_path / "ok.onnx", "-o", tmp_path / "o.onnx", "--json", tmp_path / "o.onnx"],
            "would overwrite the model",
        ),
        "json is plot": (
            [tmp_path / "ok.onnx", "--json", tmp_path / "r", "--plot", tmp_path / "r"],
            "would overwrite the --json file",
        ),
        "json is input data": (
            [tmp_path / "ext.onnx", "--json", tmp_path / "b.onnx.data"],
            "would overwrite the data of the model",
        ),
        "plot is output data": (
            [tmp_path / "ok.onnx", "-o", tmp_path / "o.onnx", "--plot", tmp_path / "o.onnx.data"],
            "would overwrite the data of the model",
        ),
        "json is inputs file": (
            [tmp_path / "ok.onnx", "--inputs", tmp_path / "x.npz", "--json", tmp_path / "x.npz"],
            "would overwrite the input file",
        ),
        "output data is input data": (
            [tmp_path / "ext.onnx", "-o", tmp_path / "b.onnx"],
            "holds the input model's tensors",
        ),
        "out of memory": ([tmp_path / "ok.onnx", "--batch", "10000000000"], "out of memory"),
        "onnxruntime refuses to run it": ([tmp_path / "small.onnx"], "onnxruntime: "),
        "empty output path": ([tmp_path / "ok.onnx", "-o", ""], "'--output': the path is empty"),
        "empty json path": ([tmp_path / "ok.onnx", "--json", ""], "'--json': the path is empty"),
        "empty model path": ([""], "'MODEL': the path is empty"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "not onnx",
        "truncated",
        "fails onnx.checker",
        "no conv",
        "conv in subgraph",
        "all ineligible",
        "output is input",
        "missing output dir",
        "unwritable output",
        "missing json dir",
        "missing plot dir",
        "unknown dim",
        "negative seed",
        "int inputs",
        "nan inputs",
        "empty inputs",
        "corrupt image",
        "empty image folder",
        "plot to stdout",
        "model to stdout",
        "output data is a directory",
        "bad L",
        "bad s",
        "bad fraction s",
        "nan bound",
        "bound out of range",
        "included and excluded",
        "output directory path",
        "plot format",
        "unknown layer",
        "bad layer L",
        "missing inputs",
        "zero-byte inputs",
        "corrupt npz",
        "json is input",
        "plot is input",
        "json is output",
        "json is plot",
        "output data is input data",
        "json is input data",
        "plot is output data",
        "json is inputs file",
        "out of memory",
        "onnxruntime refuses to run it",
        "mean without images",
        "mean for arrays",
        "include ineligible",
        "output is the input's data",
        "output is the inputs",
        "output name too long",
        "empty output path",
        "empty json path",
        "empty model path",
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, case):
    args, message = _bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    data_before = (tmp_path / "b.onnx.data").read_bytes()
    proc = subprocess.run(
        ["haste-onnx", "convert", *map(str, args)], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1  # after progress lines, and no log line of onnxruntime's
    assert all(line.startswith(("·", "error: ")) for line in proc.stderr.splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written or left
    assert (tmp_path / "ok.onnx").read_bytes() == EXAMPLE.read_bytes()
    assert (tmp_path / "b.onnx.data").read_bytes() == data_before


def test_a_report_that_cannot_be_written_leaves_no_model(example, tmp_path, monkeypatch):
    """The model, the plot and the JSON are written together or not at all: a disk that fills
    up while the JSON is written leaves no model and no partial file."""

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    before = sorted(tmp_path.iterdir())
    out, json_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = run("convert", example, "-o", out, "--json", json_path)
    assert code == 2 and f"cannot write {json_path}" in err
    assert "No space left on device" in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before


def test_image_folder_inputs_are_resized_and_scaled(example, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    code, out, err = run("convert", example, "--inputs", folder, "--json", "-", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"] == f"user inputs from {folder} (pixels / 255): input [3, 3, 32, 32]"
    model = onnx.load(example)
    (plain,) = user_feeds(model, folder).arrays.values()
    assert plain.min() >= 0.0 and plain.max() <= 1.0 and plain.max() > 0.9  # [0, 1] by default
    (scaled,) = user_feeds(model, folder, mean=(10, 20, 30), std=(2, 4, 8)).arrays.values()
    expected = (plain * 255 - np.array([10, 20, 30]).reshape(1, 3, 1, 1)) / np.array(
        [2, 4, 8]
    ).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-4)
    code, out, err = run(
        "convert", example, "--inputs", folder, "--mean", "128", "--std", "1,2,64", "--json", "-"
    )
    assert code == 0, err
    assert json.loads(out)["inputs"].startswith(
        f"user inputs from {folder} (pixels (p - 128) / [1, 2, 64])"
    )
    code, _, err = run("convert", example, "--inputs", folder, "--mean", "1,2", "-q")
    assert code == 2 and "--mean/--std: mean must be a scalar or have one value per" in err
    code, _, err = run("convert", example, "--inputs", folder, "--std", "1e-45", "-q")
    assert code == 2 and "std [1e-45] take the images beyond float32's range" in err
    code, _, err = run("convert", example, "--inputs", folder, "--std", "1e39", "-q")
    assert code == 2 and "std [1e+39] take the images beyond float32's range" in err
    assert len(err.strip().splitlines()) == 1  # no numpy warning
    code, _, err = run("convert", example, "--inputs", tmp_path / "imagess", "--mean", "128")
    assert code == 2 and "inputs not found" in err  # a misspelt folder is not "an array"
    options = pipeline.VerifyOptions(inputs=folder, mean=128, std=[64.0])  # scalars, lists
    assert pipeline.make_feeds(model, options).arrays["input"].max() <= 127 / 64


def test_plot_without_matplotlib_fails_before_any_work(example, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    code, out, err = run("convert", example, "--plot", tmp_path / "p.png")
    assert code == 2 and "--plot needs matplotlib" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.onnx"]


def test_plot_formats_are_those_matplotlib_can_draw_here(example, tmp_path, monkeypatch):
    """PGF is drawn by LaTeX: without it, refused before any work. EPS draws no transparency;
    matplotlib's warning about that is no error, and -q prints errors only."""
    monkeypatch.setattr(report.shutil, "which", lambda _name: None)
    code, _, err = run("convert", example, "--plot", tmp_path / "p.pgf")
    assert code == 2 and "--plot " + str(tmp_path / "p.pgf") + ": name a .png file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.onnx"]
    monkeypatch.setattr(report.shutil, "which", lambda name: "/usr/bin/" + name)
    assert "pgf" in report.plot_formats()
    code, out, err = run("convert", example, "--plot", tmp_path / "p.eps", "-q")
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / "p.eps").read_bytes().startswith(b"%!PS-Adobe")


def test_interrupt_exits_130_with_one_line(example, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "convert", interrupted)
    code, out, err = run("convert", example)
    assert code == 130 and err.strip() == "error: interrupted (no file is left half-written)"


def test_onnxruntime_errors_give_one_line_and_exit_2(example, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    def refused(*args, **kwargs):
        raise InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input")

    monkeypatch.setattr(pipeline, "convert", refused)
    code, out, err = run("convert", example)
    assert code == 2
    message = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input"
    assert err.strip() == f"error: onnxruntime: {message}"


def test_a_model_newer_than_onnxruntime_reads_is_refused_with_what_to_do(tmp_path, monkeypatch):
    from haste_onnx import ir

    monkeypatch.setattr(ir, "max_ir_version", lambda: 9)  # as if onnxruntime read up to 9
    model = onnx.load(EXAMPLE)
    model.ir_version = 10
    onnx.save(model, tmp_path / "new.onnx")
    code, out, err = run("convert", tmp_path / "new.onnx")
    assert code == 2
    assert "has IR version 10, and onnxruntime" in err
    assert "reads up to 9: export it with ir_version 9 or lower" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx"]


def test_max_ir_version_is_the_newest_onnxruntime_loads():
    from haste_onnx import ir
    from haste_onnx.runtime import quiet_session

    model = onnx.load(EXAMPLE)
    model.ir_version = ir.max_ir_version()
    quiet_session(model, custom_ops=False)  # loads
    if ir.max_ir_version() < onnx.IR_VERSION:
        model.ir_version += 1
        with pytest.raises(Exception, match="IR version"):
            quiet_session(model, custom_ops=False)


def test_more_flops_are_called_more(example):
    """With L = 63 almost no channel merges, and the hashing costs more than merging saves."""
    code, out, err = run("convert", example, "-L", "63")
    assert code == 0, err
    (total,) = [line for line in out.splitlines() if line.startswith("converted layers:")]
    assert "% more)" in total and "fewer" not in total


def test_a_converted_model_is_not_taken_for_an_original(example, tmp_path):
    out = tmp_path / "out.onnx"
    assert run("convert", example, "-o", out, "-q")[0] == 0
    again = tmp_path / "again.onnx"
    for args in (["convert", out, "-o", again], ["inspect", out], ["verify", out, out]):
        code, _, err = run(*args)
        assert code == 2 and "holds HasteConv nodes: it is a converted model" in err, err
    assert not again.exists()


def test_interrupt_while_importing_exits_130(monkeypatch, capsys):
    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "haste_onnx.cli.main":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.run()
    assert stop.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_evaluate_refuses_a_report_over_its_data(tmp_path):
    data, source = (
        tmp_path / "fashion.npz",
        Path(__file__).parent / "data" / "fashion_mnist_test_500.npz",
    )
    shutil.copy(source, data)
    model = Path(__file__).parent.parent / "models" / "fashion" / "resnet18_fashion.onnx"
    code, _, err = run("evaluate", model, "--data", data, "--json", data, "--planes", "14")
    assert code == 2 and f"--json {data} would overwrite the input file {data}" in err
    assert data.read_bytes() == source.read_bytes()


def test_evaluate_reads_an_image_folder_as_the_model_takes_images(tmp_path):
    """RGB images of another size, in class folders, for a grey 28x28 model: converted and
    resized as --inputs does (grey RGB converts back exactly: the same accuracy as the arrays)."""
    from PIL import Image

    model = Path(__file__).parent.parent / "models" / "fashion" / "resnet18_fashion.onnx"
    data = np.load(Path(__file__).parent / "data" / "fashion_mnist_test_500.npz")
    x, y = data["images"][:8].reshape(8, 28, 28), data["labels"][:8]
    for i, (image, label) in enumerate(zip(x, y)):
        (tmp_path / "images" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(tmp_path / "images" / str(label) / f"{i}.png")
    large = Image.fromarray(x[0]).resize((40, 30)).convert("RGB")
    large.save(tmp_path / "images" / str(y[0]) / "large.png")
    resized = np.asarray(large.convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    np.savez(tmp_path / "same.npz", x=np.stack([*x, resized]), y=np.append(y, y[0]))
    sweep = ["--planes", "4", "--seeds", "1", "--stats-images", "2", "--json", "-"]
    accuracy = {}
    for data_set in ("images", "same.npz"):
        code, out, err = run("evaluate", model, "--data", tmp_path / data_set, *sweep)
        assert code == 0, err
        accuracy[data_set] = json.loads(out)["baseline"]["accuracy"]
    assert accuracy["images"] == accuracy["same.npz"]


def test_evaluate_writes_its_json_whatever_becomes_of_stdout(tmp_path):
    model = Path(__file__).parent.parent / "models" / "fashion" / "resnet18_fashion.onnx"
    data, report = (
        Path(__file__).parent / "data" / "fashion_mnist_test_500.npz",
        tmp_path / "r.json",
    )
    command = ["haste-onnx", "evaluate", model, "--data", data, "--limit", "4", "--planes", "4"]
    proc = subprocess.Popen(
        [*command, "--seeds", "1", "--stats-images", "2", "--json", report],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader goes away before the table
    assert proc.wait() == 141 and json.loads(report.read_text())["sweep"]


def test_the_command_imports_nothing_heavy_before_it_can_handle_ctrl_c(tmp_path):
    """The console script's module, haste_onnx.cli, loads neither onnx nor onnxruntime nor
    numpy (until its run() has started, Ctrl-C can only end in a traceback); the package's
    names are imported when first used, every one of them."""
    code = "import sys, haste_onnx.cli; print(sorted({'onnx', 'numpy'} & set(sys.modules)))"
    proc = subprocess.run(  # not from the source tree, which -c would import first
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert proc.stdout.strip() == "[]"
    code = "import haste_onnx; print(haste_onnx.speed.time_layers, haste_onnx.errors.InputError)"
    proc = subprocess.run(  # the submodules the README uses, from a fresh import
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and "time_layers" in proc.stdout, proc.stderr
    import haste_onnx

    assert all(getattr(haste_onnx, name) is not None for name in haste_onnx.__all__)


def test_sigterm_ends_the_command_like_ctrl_c(tmp_path):
    model = Path(__file__).parent.parent / "models" / "fashion" / "resnet18_fashion.onnx"
    proc = subprocess.Popen(
        ["haste-onnx", "convert", model, "-o", tmp_path / "out.onnx", "--batch", "16"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # under way: the command has handled its first step
        if "rewriting" in line:
            break
    proc.terminate()
    rest = proc.stderr.read()
    assert proc.wait() == 130
    assert rest.strip().splitlines()[-1] == "error: interrupted (no file is left half-written)"
    assert list(tmp_path.iterdir()) == []


def test_json_to_stdout_only_once_the_files_are_in_place(example, tmp_path, monkeypatch):
    def cannot_move(*_args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(staging.os, "replace", cannot_move)
    before = sorted(tmp_path.iterdir())
    code, out, err = run("convert", example, "-o", tmp_path / "out.onnx", "--json", "-")
    assert code == 2 and "Input/output error" in err
    assert out == ""  # no report naming files that are not there
    assert sorted(tmp_path.iterdir()) == before


def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(example):
    proc = subprocess.Popen(
        ["haste-onnx", "inspect", example], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes its first line
    assert proc.wait() == 141
    assert proc.stderr.read() == b""


def test_inspect_needs_no_float_inputs_nor_every_size(tmp_path):
    """Eligibility needs neither; FLOPs need only shapes, and are unknown where a size is."""
    model = graphs.vgg_like()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, out, err = run("inspect", path)
    assert code == 0, err
    assert "features.1" in out and "without 5 of unknown shape" in out and "--dim NAME=SIZE" in out


def test_a_signal_during_the_moves_takes_effect_once_all_are_moved(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_then_interrupt(source, destination):
        real_replace(source, destination)
        # Ctrl-C after the first file, as the terminal sends it: to the process, where any of
        # its threads may take it (onnxruntime's workers are threads of their own)
        sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
        sender.start()
        sender.join()
        time.sleep(0.01)  # the main thread's handler runs between two bytecodes

    files = [tmp_path / "model.onnx", tmp_path / "report.json"]
    with staging.Staging() as stage:
        for path in files:
            stage.write(path, lambda staged: staged.write_text("whole"))
        monkeypatch.setattr(staging.os, "replace", replace_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            stage.commit()
    assert [path.read_text() for path in files] == ["whole", "whole"]
    assert sorted(tmp_path.iterdir()) == files


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from haste_onnx import staging

def write(path):
    path.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)

staging.Staging().write(Path(sys.argv[1]) / "model.onnx", write)
"""


def test_the_directory_of_a_run_killed_outright_goes_with_the_next_run(example, tmp_path):
    """SIGKILL leaves no time to clean up: the next run in the folder removes what is left,
    but not the directory of a run still under way, nor a new one."""
    out = tmp_path / "out"
    out.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, out])
    assert killed.returncode == -signal.SIGKILL
    [left] = out.glob(".haste-onnx-staging-*")
    assert (left / "model.onnx").read_text() == "half"
    young, own = out / ".haste-onnx-staging-young___", out / ".haste-onnx-settings"
    young.mkdir()
    own.mkdir()  # a user's, not one of a run: never removed
    with staging.Staging() as running:
        running.write(out / "report.json", lambda path: path.write_text("{}"))
        [held] = set(out.glob(".haste-onnx-staging-*")) - {left, young}
        an_hour_ago = time.time() - 3600
        for directory in (left, held, own):
            os.utime(directory, (an_hour_ago, an_hour_ago))
        code, _, err = run("convert", example, "-o", out / "model.onnx", "-q")
        assert code == 0, err
        assert sorted(out.glob(".haste-onnx-staging-*")) == sorted([held, young])
    assert sorted(out.iterdir()) == sorted([own, young, out / "model.onnx"])


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("old")
    path.chmod(0o640)  # restricted weights stay restricted
    with staging.Staging() as stage:
        stage.write(path, lambda staged: staged.write_text("new"))
        stage.commit()
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_commits_into_one_folder_take_turns(tmp_path):
    """A run moving its files into the folder holds the folder's lock, and a commit waits for
    it: two runs writing one model do not interleave (one's model with the other's .data)."""
    import fcntl

    path = tmp_path / "m.onnx"
    other = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    with staging.Staging() as stage:
        stage.write(path, lambda staged: staged.write_text("new"))
        committer = threading.Thread(target=stage.commit)
        committer.start()
        time.sleep(0.5)
        assert not path.exists()  # waiting for the other run
        os.close(other)
        committer.join(10)
    assert path.read_text() == "new"


def test_files_into_one_folder_spelt_two_ways_are_written(example, tmp_path):
    """The folder is locked once: locked again under its other name, the commit waited on its
    own lock for ever (an absolute -o with a relative --json)."""
    command = ["haste-onnx", "convert", example, "-o", tmp_path / "m.onnx", "--json", "m.json"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.json").is_file()


def test_a_process_s_open_file_is_refused_not_replaced(example, tmp_path):
    """/dev/stdout redirected to a file links to a regular file, through /proc: as root, the
    link itself in /dev was replaced by the model."""
    with open(tmp_path / "redirected", "w") as held:
        own = tmp_path / "my_stdout"  # a link of one's own to it: replaced before
        own.symlink_to(f"/proc/self/fd/{held.fileno()}")
        for path in (f"/dev/fd/{held.fileno()}", f"/proc/self/fd/{held.fileno()}", own):
            for option in ("-o", "--json", "--plot"):
                code, _, err = run("convert", example, option, path)
                assert code == 2 and "a device or a process's open file" in err, err
    assert (tmp_path / "redirected").stat().st_size == 0 and own.is_symlink()
    assert not (tmp_path / "example.haste.onnx").exists()


def test_devices_and_pipes_are_refused_not_replaced(example, tmp_path):
    """A file is written beside its destination and renamed over it: over a device or a pipe
    that would replace it (as root, even /dev/null), not write to it."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for args in (["-o", pipe], ["--json", pipe], ["--plot", pipe]):
        code, _, err = run("convert", example, *args)
        assert code == 2 and f"{pipe} is not a regular file" in err, err
        assert stat.S_ISFIFO(pipe.stat().st_mode)
    with pytest.raises(InputError, match="not a regular file"):
        staging.check_writable(Path("/dev/null"), "-o")  # a device: only checked, not written
    proc = subprocess.run(  # a pipe as the model: refused, not waited on for ever
        ["haste-onnx", "convert", pipe, "--json", tmp_path / "r.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and f"not a file: {pipe}" in proc.stderr


def test_a_symbolic_link_as_output_is_replaced_by_the_model_and_its_data(tmp_path):
    """Written through the link, the data file went beside its target, where a model loaded by
    the link's path does not look for it."""
    source = tmp_path / "ext.onnx"
    onnx.save(onnx.load(EXAMPLE), source, save_as_external_data=True, location="ext.onnx.data")
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    link = tmp_path / "here" / "link.onnx"
    link.symlink_to(tmp_path / "there" / "real.onnx")
    code, _, err = run("convert", source, "-o", link, "-q")
    assert code == 0, err
    assert not link.is_symlink() and (tmp_path / "here" / "link.onnx.data").is_file()
    assert list((tmp_path / "there").iterdir()) == []
    code, _, err = run("verify", source, link, "-q")
    assert code == 0, err
    loop = tmp_path / "loop.onnx"
    loop.symlink_to(loop)
    for option in ("-o", "--json"):
        code, _, err = run("convert", source, option, loop)
        assert code == 2 and "Too many levels of symbolic links" in err, err


def test_a_commit_that_fails_puts_back_every_file_it_moved(tmp_path, monkeypatch):
    """Old files are put back, and a new file moved before the failure is removed. The model's
    name has 255 characters, the most a name may have: an old file is kept under its own name
    (with a suffix, it could not be kept)."""
    files = [tmp_path / ("n" * 250 + ".onnx"), tmp_path / "report.json", tmp_path / "new.txt"]
    files.append(tmp_path / "new.png")
    for path in files[:2]:
        path.write_text("old")
    real_replace = os.replace

    def busy_report(source, destination):  # a bind-mounted file: EBUSY
        if Path(destination) == files[3]:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(source, destination)

    with staging.Staging() as stage:
        for path in files:
            stage.write(path, lambda staged: staged.write_text("new"))
        monkeypatch.setattr(staging.os, "replace", busy_report)
        busy = f"cannot write {files[3]}: Device or resource busy; nothing was written"
        with pytest.raises(InputError, match=busy):
            stage.commit()
    assert [path.read_text() for path in files[:2]] == ["old", "old"]
    assert sorted(tmp_path.iterdir()) == files[:2]


def test_a_commit_says_what_it_could_not_put_back(tmp_path, monkeypatch):
    files = [tmp_path / "model.onnx", tmp_path / "report.json"]
    files[0].write_text("old")
    real_replace = os.replace
    calls = []

    def second_fails(source, destination):  # the report's move, then putting the model back
        calls.append(destination)
        if len(calls) >= 2:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, destination)

    with staging.Staging() as stage:
        for path in files:
            stage.write(path, lambda staged: staged.write_text("new"))
        monkeypatch.setattr(staging.os, "replace", second_fails)
        with pytest.raises(InputError, match="only .*model.onnx .the old one is .*replaced") as e:
            stage.commit()
    kept = Path(str(e.value).split("the old one is ")[1].split(")")[0])
    assert files[0].read_text() == "new" and kept.read_text() == "old"  # kept, not deleted


def test_json_on_stdout_does_not_depend_on_stderr(example, tmp_path):
    proc = subprocess.run(
        ["bash", "-c", f"haste-onnx convert '{example}' -o '{tmp_path / 'o.onnx'}' --json - 2>&-"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["passed"] is True


def test_signals_the_caller_held_stay_held(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["haste-onnx", "--version"])
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        cli.run()
        assert signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_what_is_written_does_not_depend_on_stdout_or_stderr(example, tmp_path):
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen(
        ["haste-onnx", "convert", example, "-o", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader goes away before the report
    assert proc.wait() == 141 and out.is_file()
    out.unlink()
    proc = subprocess.run(["bash", "-c", f"haste-onnx convert '{example}' -o '{out}' 2>&-"])
    assert proc.returncode == 0 and out.is_file()  # no stderr for the progress lines


def test_a_signal_whose_interrupt_python_dropped_still_ends_the_command(example, tmp_path):
    """Python runs a signal handler wherever the main thread is, a finalizer included, and drops
    the KeyboardInterrupt raised there: the signal taken still ends the command before it writes
    anything, with exit 130."""
    with pytest.raises(KeyboardInterrupt):
        cli._interrupt(signal.SIGTERM, None)  # as if raised in a finalizer, and dropped
    assert cli.interrupted()
    out = tmp_path / "out.onnx"
    code, _, err = run("convert", example, "-o", out)
    assert code == 130, err
    assert "interrupted" in err
    assert not out.exists()


def test_a_signal_while_the_libraries_load_exits_130(example, tmp_path):
    """Held back until the imports are done: onnxruntime interrupted in its own start-up code
    failed as an ImportError (exit 1, a traceback), or crashed. The signals come at shares of
    the time the command takes to start (`--help`: Python and the imports) on this machine, while
    a conversion, which takes longer, is under way."""
    start = time.monotonic()
    subprocess.run(["haste-onnx", "--help"], stdout=subprocess.DEVNULL, check=True)
    startup = time.monotonic() - start
    out = tmp_path / "out.onnx"
    for share in (0.3, 0.5, 0.7, 0.9):
        proc = subprocess.Popen(
            ["haste-onnx", "convert", example, "-o", out],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(startup * share)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        # before Python runs the script (the first tens of ms), SIGTERM ends it unhandled
        assert proc.returncode in (130, -signal.SIGTERM), (share, startup, proc.returncode, err)
        assert b"Traceback" not in err
        assert not out.exists()


def test_a_failed_commit_names_every_old_file_it_could_not_put_back(tmp_path, monkeypatch):
    """A model and its .data are staged in one directory: both old files are kept there."""
    model, data, report = tmp_path / "m.onnx", tmp_path / "m.onnx.data", tmp_path / "r.json"
    for path in (model, data, report):
        path.write_text("old")

    def model_and_data(staged: Path) -> None:
        staged.write_text("new")
        staged.with_name(staged.name + ".data").write_text("new")

    def refuse(source, destination):  # the report, then putting back what was moved
        raise OSError(errno.EIO, "Input/output error")

    real_replace = os.replace
    with staging.Staging() as stage:
        stage.write(model, model_and_data)
        stage.write(report, lambda staged: staged.write_text("new"))
        moves = iter([real_replace, real_replace])
        monkeypatch.setattr(staging.os, "replace", lambda s, d: next(moves, refuse)(s, d))
        with pytest.raises(InputError) as error:
            stage.commit()
    message = str(error.value)
    assert f"cannot write {report}" in message and message.count("the old one is") == 2
    kept = [Path(part.split(")")[0]) for part in message.split("the old one is ")[1:]]
    assert [path.read_text() for path in kept] == ["old", "old"]


def test_a_link_as_output_is_not_taken_for_the_file_it_names(example, tmp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(example)  # replacing the link leaves the model it names alone
    before = example.read_bytes()
    code, _, err = run("convert", example, "-o", link, "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert example.read_bytes() == before and not link.is_symlink()


def test_inspect_writes_its_json_whatever_becomes_of_stdout(example, tmp_path):
    report = tmp_path / "r.json"
    proc = subprocess.Popen(
        ["haste-onnx", "inspect", example, "--json", report], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.wait() == 141 and json.loads(report.read_text())["convs"]


def test_an_interrupt_with_stderr_closed_leaves_stdout_to_the_json(tmp_path):
    model = Path(__file__).parent.parent / "models" / "fashion" / "resnet18_fashion.onnx"
    command = f"haste-onnx convert '{model}' -o '{tmp_path / 'o.onnx'}' --batch 32 --json - 2>&-"
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], stdout=subprocess.PIPE)
    time.sleep(1.5)  # past the imports, within the conversion
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out == b""


def test_verify_refuses_a_hand_edited_converted_model_in_one_line(example, tmp_path):
    assert run("convert", example, "-q")[0] == 0
    model = onnx.load(tmp_path / "example.haste.onnx")
    node = next(n for n in model.graph.node if n.op_type == "HasteConv")
    (tile,) = [a for a in node.attribute if a.name == "tile"]
    node.attribute.remove(tile)
    node.attribute.append(onnx.helper.make_attribute("tile", [3]))
    onnx.save(model, tmp_path / "edited.onnx")
    code, _, err = run("verify", example, tmp_path / "edited.onnx")
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: HasteConv {node.name!r} has tile [3], where it is a positive integer: is this "
        "model as haste-onnx wrote it?"
    ]


def test_verify_exits_1_when_fidelity_fails(example, tmp_path):
    assert run("convert", example, "-q")[0] == 0
    converted = tmp_path / "example.haste.onnx"
    code, _, err = run("verify", example, converted, "--min-cosine", "0.9999999")
    assert code == 1 and "error: fidelity check failed" in err, err


def test_an_image_folder_is_resized_to_the_dims_given_by_name(tmp_path):
    image = pytest.importorskip("PIL.Image")
    model = graphs.vgg_like()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    (tmp_path / "images").mkdir()
    image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (x,) = user_feeds(model, tmp_path / "images", {"H": 12, "W": 20}).arrays.values()
    assert x.shape == (1, 3, 12, 20)


def test_max_rel_l2_fails_the_check_and_says_what_would_pass(example, tmp_path):
    code, out, err = run("convert", example, "--max-rel-l2", "1e-9", "--json", "-")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["passed"] is False and doc["output"] == []
    assert any("relative L2 error" in f and "--max-rel-l2" in f for f in doc["failures"])
    assert not (tmp_path / "example.haste.onnx").exists()
    code, _, err = run("convert", example, "--max-rel-l2", "10", "-q")
    assert code == 0, err


def test_dim_sizes_the_first_axis_too():
    model = onnx.load(EXAMPLE)  # input [N, 3, 32, 32]
    feeds = inputs.random_feeds(model, batch=2, dims={"N": 3})
    assert feeds.arrays["input"].shape == (3, 3, 32, 32)
    assert inputs.random_feeds(model, batch=2).arrays["input"].shape == (2, 3, 32, 32)


def _fixed_batch_model() -> onnx.ModelProto:
    model = graphs.vgg_like()  # x [N, 3, 16, 16]
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.ir_version = graphs.IR_VERSION
    return model


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 3, 8, 8), (1, 3, 16)])
def test_arrays_of_the_wrong_shape_are_refused(tmp_path, shape):
    """(Two images for a fixed batch of one are taken, one at a time.)"""
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    with pytest.raises(InputError, match="does not fit the model's"):
        inputs.user_feeds(_fixed_batch_model(), tmp_path / "x.npy")


def test_npz_arrays_are_taken_by_input_name_not_by_position(tmp_path):
    model = graphs.vgg_like()  # one input, "x"
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "both.npz", labels=np.arange(2), x=x)
    np.testing.assert_array_equal(inputs.user_feeds(model, tmp_path / "both.npz").arrays["x"], x)
    np.savez(tmp_path / "other.npz", images=x)
    with pytest.raises(InputError, match=r"lacks arrays for inputs \['x'\]"):
        inputs.user_feeds(model, tmp_path / "other.npz")


def test_sparsity_dense_gives_gaussian_planes(example, tmp_path):
    out = tmp_path / "dense.onnx"
    code, stdout, err = run("convert", example, "-s", "dense", "-o", out, "--json", "-", "-q")
    assert code == 0, err
    assert json.loads(stdout)["options"]["sparsity"] is None
    model = onnx.load(out)
    planes = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if "planes" in t.name]
    assert planes and all(np.all(p != 0) and not np.all(np.abs(p) == 1) for p in planes)


def test_a_read_only_output_directory_is_refused_before_any_work(example, tmp_path, monkeypatch):
    """A directory the user may not write to (as seen by os.access: root may write anywhere, so
    it is made read-only for the check itself) is refused up front, exit 2, nothing written."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access

    def no_write_in_locked(path, mode, *args, **kwargs):
        if Path(path) == locked and mode & os.W_OK:
            return False
        return access(path, mode, *args, **kwargs)

    monkeypatch.setattr(staging.os, "access", no_write_in_locked)
    code, _, err = run("convert", example, "-o", locked / "out.onnx")
    assert code == 2 and f"output directory is not writable: {locked}" in err, err
    assert list(locked.iterdir()) == []


def test_a_failed_commit_puts_back_old_files_where_hard_links_are_refused(tmp_path, monkeypatch):
    """Where the file system refuses a hard link, the old file is kept as a copy: a commit that
    fails after replacing it still puts it back, and says nothing was written."""
    files = [tmp_path / "model.onnx", tmp_path / "report.json"]
    files[0].write_text("old")
    real_replace = os.replace
    calls = []

    def refuse_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    def second_fails(source, destination):  # the report's move fails; putting back works
        calls.append(destination)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, destination)

    with staging.Staging() as stage:
        for path in files:
            stage.write(path, lambda staged: staged.write_text("new"))
        monkeypatch.setattr(staging.os, "link", refuse_link)
        monkeypatch.setattr(staging.os, "replace", second_fails)
        with pytest.raises(InputError, match="nothing was written"):
            stage.commit()
    assert files[0].read_text() == "old" and not files[1].exists()
