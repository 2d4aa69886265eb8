"""Train a ResNet-18-style and a VGG-BN-style CNN on Fashion-MNIST and export them to ONNX.

Input of the exported models: ``input`` float32 ``[N, 1, 28, 28]``, normalized as

    x = (pixel / 255 - 0.2860) / 0.3530        # pixel in 0..255
      = (pixel - 72.93) / 90.015               # haste_onnx.datasets.normalize(x, MEAN, STD)

Output: ``logits`` float32 ``[N, 10]`` (no softmax). BatchNormalization is folded into the
preceding Conv in the ONNX graph (it is exact in inference mode). Opset 17, IR version 8,
dynamic batch axis.

Usage (from the repository root; the data comes from ``bash models/fetch_data.sh`` or the Debian
package ``dataset-fashion-mnist``):

    python models/fashion/train.py bench                    # time a few steps of each model
    python models/fashion/train.py train --model resnet18 --width 64 --epochs 1.5
    python models/fashion/train.py train --model vgg --width 64 --epochs 1.0
    python models/fashion/train.py evaluate models/fashion/resnet18_fashion.onnx

Training runs on one CPU thread by default (``--threads``), so the other core stays free.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from haste_onnx.datasets import load_fashion_mnist, normalize  # noqa: E402

MEAN = 0.2860 * 255.0  # Fashion-MNIST training-set pixel mean, 0..255 units
STD = 0.3530 * 255.0  # and standard deviation
OPSET = 17
IR_VERSION = 8
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models (torch is imported lazily so that `evaluate` needs only onnxruntime)


def build_model(name: str, width: int):
    """ResNet-18-style (``resnet18``) or VGG-BN-style (``vgg``) network for 28x28x1 inputs."""
    import torch.nn as nn

    def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
            self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            skip = x if self.shortcut is None else self.shortcut(x)
            return self.relu(out + skip)

    class ResNet18(nn.Module):
        """Stem 3x3 conv + 2x2 max-pool (28 -> 14), then four stages of two BasicBlocks with
        widths w, 2w, 4w, 8w at 14, 7, 4, 2 pixels, global average pool, linear."""

        def __init__(self, w: int) -> None:
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(1, w), nn.ReLU(inplace=True), nn.MaxPool2d(2))
            blocks, cin = [], w
            for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
                for j in range(2):
                    blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            x = self.pool(self.blocks(self.stem(x)))
            return self.fc(x.flatten(1))

    class VGG(nn.Module):
        """VGG-11-BN-like: 3x3 conv + BN + ReLU blocks with max-pools, widths w..8w,
        global average pool, linear: [w, M, 2w, 2w, M, 4w, 4w, M, 8w, 8w, 8w]."""

        cfg = [1, "M", 2, 2, "M", 4, 4, "M", 8, 8, 8]

        def __init__(self, w: int) -> None:
            super().__init__()
            layers, cin = [], 1
            for v in self.cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(2))
                else:
                    layers += [*conv_bn(cin, v * w), nn.ReLU(inplace=True)]
                    cin = v * w
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1))

    if name == "resnet18":
        return ResNet18(width)
    if name == "vgg":
        return VGG(width)
    raise ValueError(f"unknown model {name!r}: use 'resnet18' or 'vgg'")


# --------------------------------------------------------------------------------------------
# ONNX export: a small explicit emitter (Conv with folded BN, Relu, Add, MaxPool,
# GlobalAveragePool, Flatten, Gemm), so the graph does not depend on the torch exporter.


class _Emitter:
    """Collects nodes and initializers; every node and its output tensor are named after the
    torch module they come from (``blocks.3.conv1``), so layer reports read like the model."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(self, x: str, conv, bn, name: str) -> str:
        """Conv followed by inference-mode BatchNorm, folded into one Conv with bias."""
        w = conv.weight.detach().double().numpy()
        b = (
            conv.bias.detach().double().numpy()
            if conv.bias is not None
            else np.zeros(w.shape[0], np.float64)
        )
        scale = bn.weight.detach().double().numpy() / np.sqrt(
            bn.running_var.detach().double().numpy() + bn.eps
        )
        w = w * scale[:, None, None, None]
        b = (b - bn.running_mean.detach().double().numpy()) * scale
        b = b + bn.bias.detach().double().numpy()
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        return self.node(
            "Conv",
            [x, self.const(name + ".weight", w), self.const(name + ".bias", b)],
            name,
            kernel_shape=list(k),
            strides=list(s),
            pads=[p[0], p[1], p[0], p[1]],
            dilations=[1, 1],
            group=1,
        )


def export_onnx(model, name: str, path: Path) -> None:
    """Write ``model`` (in eval mode) as ONNX with BN folded into the convolutions."""
    import onnx
    import torch.nn as nn
    from onnx import TensorProto, helper

    model.eval()
    e = _Emitter()
    x = "input"
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    if name == "resnet18":
        conv, bn, _, _ = model.stem
        x = e.node("Relu", [e.conv_bn(x, conv, bn, "stem.conv")], "stem.relu")
        x = e.node("MaxPool", [x], "stem.pool", **pool)
        for i, blk in enumerate(model.blocks):
            pre = f"blocks.{i}"
            h = e.conv_bn(x, blk.conv1, blk.bn1, f"{pre}.conv1")
            h = e.node("Relu", [h], f"{pre}.relu1")
            h = e.conv_bn(h, blk.conv2, blk.bn2, f"{pre}.conv2")
            skip = x
            if blk.shortcut is not None:
                skip = e.conv_bn(x, blk.shortcut[0], blk.shortcut[1], f"{pre}.shortcut")
            x = e.node("Relu", [e.node("Add", [h, skip], f"{pre}.add")], f"{pre}.relu2")
    else:
        mods = list(model.features)
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.Conv2d):
                x = e.conv_bn(x, m, mods[i + 1], f"features.{i}")
                x = e.node("Relu", [x], f"features.{i + 2}")
                i += 3
            else:
                x = e.node("MaxPool", [x], f"features.{i}", **pool)
                i += 1
    x = e.node("Flatten", [e.node("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    fc = model.fc
    wname = e.const("fc.weight", fc.weight.detach().numpy())
    bname = e.const("fc.bias", fc.bias.detach().numpy())
    e.nodes.append(helper.make_node("Gemm", [x, wname, bname], ["logits"], transB=1, name="fc"))
    graph = helper.make_graph(
        e.nodes,
        f"{name}_fashion_mnist",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        e.inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="haste-onnx models/fashion/train.py",
    )
    m.ir_version = IR_VERSION
    m.doc_string = (
        f"{name} trained on Fashion-MNIST. input: [N,1,28,28] float32, "
        f"(pixel/255 - 0.2860)/0.3530; output: logits [N,10]. BN folded into Conv."
    )
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


# --------------------------------------------------------------------------------------------
# Evaluation with onnxruntime


def onnx_predict(path: Path, x: np.ndarray, batch: int = 500, threads: int = 1) -> np.ndarray:
    """Logits of the ONNX model at ``path`` for normalized inputs ``x``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def evaluate_onnx(
    path: Path, threads: int = 1, data: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    """Top-1 accuracy of the ONNX model on the full 10k Fashion-MNIST test set (raw 0..255
    ``data`` if given, else loaded)."""
    x, y = load_fashion_mnist("test") if data is None else data
    logits = onnx_predict(path, normalize(x, MEAN, STD), threads=threads)
    return float((logits.argmax(1) == y).mean())


# --------------------------------------------------------------------------------------------
# Training


def _augment(xb, pad: int = 2):
    """Random shift by up to ``pad`` pixels (zero padding, like a padded random crop) and
    random horizontal flip, on a normalized torch batch."""
    import torch
    import torch.nn.functional as F

    n = xb.shape[0]
    bg = (0.0 - MEAN) / STD  # the value of a black pixel after normalization
    padded = F.pad(xb, (pad, pad, pad, pad), value=bg)
    dx = torch.randint(0, 2 * pad + 1, (n,))
    dy = torch.randint(0, 2 * pad + 1, (n,))
    out = torch.empty_like(xb)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn as nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x, y = load_fashion_mnist("train")
    x = normalize(x, MEAN, STD)
    if args.subset and args.subset < len(x):
        idx = np.random.default_rng(args.seed).permutation(len(x))[: args.subset]
        x, y = x[idx], y[idx]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    xv, yv = load_fashion_mnist("test")
    xv_t = torch.from_numpy(normalize(xv, MEAN, STD))

    model = build_model(args.model, args.width)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(xt) // args.batch
    model = model.to(memory_format=torch.channels_last)
    total_steps = int(round(args.epochs * steps_per_epoch))
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.25
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    print(
        f"{args.model} width={args.width} params={n_params:,} train={len(xt)} "
        f"epochs={args.epochs} batch={args.batch} threads={args.threads}",
        flush=True,
    )

    def test_acc(n: int | None = None) -> float:
        model.eval()
        correct = 0
        xs, ys = (xv_t, yv) if n is None else (xv_t[:n], yv[:n])
        with torch.no_grad():
            for i in range(0, len(xs), 500):
                correct += int((model(xs[i : i + 500]).argmax(1).numpy() == ys[i : i + 500]).sum())
        model.train()
        return correct / len(xs)

    t0 = time.time()
    history = []
    te = time.time()
    tot_loss, tot_ok, seen = 0.0, 0, 0
    perm = torch.randperm(len(xt))
    pos = 0
    for step in range(total_steps):
        if pos + args.batch > len(xt):  # start a new pass over the (shuffled) training set
            perm, pos = torch.randperm(len(xt)), 0
        bi = perm[pos : pos + args.batch]
        pos += args.batch
        xb, yb = _augment(xt[bi]).contiguous(memory_format=torch.channels_last), yt[bi]
        out = model(xb)
        loss = loss_fn(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tot_loss += float(loss.detach()) * len(bi)
        tot_ok += int((out.argmax(1) == yb).sum())
        seen += len(bi)
        if step % 50 == 0:
            print(
                f"  step {step}/{total_steps} loss {tot_loss / seen:.4f} "
                f"acc {tot_ok / seen:.4f} {time.time() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % steps_per_epoch == 0 or step + 1 == total_steps:
            rec = {
                "step": step + 1,
                "epoch": round((step + 1) / steps_per_epoch, 3),
                "train_loss": tot_loss / seen,
                "train_acc": tot_ok / seen,
                "test_acc_first2000": test_acc(2000),
                "seconds": round(time.time() - te, 1),
            }
            history.append(rec)
            print(json.dumps(rec), flush=True)
            te = time.time()
            tot_loss, tot_ok, seen = 0.0, 0, 0
    train_seconds = time.time() - t0
    if args.save_pt:
        torch.save(model.state_dict(), args.save_pt)

    out = Path(args.out_dir) / f"{args.model}_fashion.onnx"
    export_onnx(model, args.model, out)
    # Check the ONNX against torch on a batch, then measure it on the full test set.
    model.eval()
    with torch.no_grad():
        ref = model(xv_t[:256]).numpy()
    diff = float(np.abs(onnx_predict(out, xv_t[:256].numpy()) - ref).max())
    torch_acc = test_acc()
    onnx_acc = evaluate_onnx(out, threads=args.threads, data=(xv, yv))
    result = {
        "model": args.model,
        "width": args.width,
        "widths": (
            [args.width * k for k in (1, 2, 4, 8)]
            if args.model == "resnet18"
            else [args.width * v for v in VGG_CFG if v != "M"]
        ),
        "params": n_params,
        "train_images": len(xt),
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "torch_test_acc": torch_acc,
        "onnx_test_acc": onnx_acc,
        "onnx_vs_torch_max_abs_diff": diff,
        "onnx_file": out.name,
        "onnx_bytes": out.stat().st_size,
        "torch_version": torch.__version__,
        "history": history,
    }
    (Path(args.out_dir) / f"{args.model}_fashion.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return result


VGG_CFG = [1, "M", 2, 2, "M", 4, 4, "M", 8, 8, 8]


def reexport(args: argparse.Namespace) -> None:
    """Export a saved state_dict again (``--save-pt`` of ``train``) and update the run's
    record with the new file's check and accuracy; the training fields are kept."""
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.width)
    model.load_state_dict(torch.load(args.pt, map_location="cpu", weights_only=True))
    model.eval()
    out = Path(args.out_dir) / f"{args.model}_fashion.onnx"
    export_onnx(model, args.model, out)
    xv, yv = load_fashion_mnist("test")
    xn = normalize(xv, MEAN, STD)
    with torch.no_grad():
        ref = model(torch.from_numpy(xn[:256])).numpy()
    rec_path = Path(args.out_dir) / f"{args.model}_fashion.json"
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {"model": args.model}
    rec.update(
        {
            "onnx_vs_torch_max_abs_diff": float(np.abs(onnx_predict(out, xn[:256]) - ref).max()),
            "onnx_test_acc": evaluate_onnx(out, threads=args.threads, data=(xv, yv)),
            "onnx_file": out.name,
            "onnx_bytes": out.stat().st_size,
        }
    )
    rec_path.write_text(json.dumps(rec, indent=2))
    print(json.dumps({k: v for k, v in rec.items() if k != "history"}), flush=True)


def bench(args: argparse.Namespace) -> None:
    """Time training steps of each model/width to plan the budget."""
    import torch
    import torch.nn as nn

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    for name in ("resnet18", "vgg"):
        for width in args.widths:
            model = build_model(name, width)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            times = []
            for _ in range(args.steps + 1):
                t = time.time()
                loss = nn.functional.cross_entropy(model(_augment(x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.time() - t)
            per = float(np.median(times[1:]))
            print(
                f"{name:9s} width {width:3d}: {per * 1000:.0f} ms/step of {args.batch} -> "
                f"{per * 60000 / args.batch / 60:.1f} min per 60k-image epoch",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time a few training steps")
    b.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("train", help="train one model and export it")
    t.add_argument("--model", choices=["resnet18", "vgg"], required=True)
    t.add_argument("--width", type=int, default=64, help="channels of the first stage")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the data (fractional ok)")
    t.add_argument("--subset", type=int, default=0, help="train on this many images (0: all)")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out-dir", default=str(HERE))
    t.add_argument("--save-pt", type=Path, help="also save the torch state_dict here")
    x = sub.add_parser("export", help="export a saved state_dict (train --save-pt) again")
    x.add_argument("--model", choices=["resnet18", "vgg"], required=True)
    x.add_argument("--width", type=int, default=64)
    x.add_argument("--pt", type=Path, required=True)
    x.add_argument("--threads", type=int, default=1)
    x.add_argument("--out-dir", default=str(HERE))
    ev = sub.add_parser("evaluate", help="accuracy of an exported ONNX on the 10k test set")
    ev.add_argument("onnx", type=Path)
    ev.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "bench":
        bench(args)
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "export":
        reexport(args)
    else:
        print(f"{args.onnx}: top-1 {evaluate_onnx(args.onnx, args.threads):.4f} on 10000 images")


if __name__ == "__main__":
    main()
