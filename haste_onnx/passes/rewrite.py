"""Which Conv nodes become HasteConv, and the rewrite itself.

Every eligibility rule is a check that returns the reason it refuses (or None); the reasons are
kept for the report. The rewrite folds a following BatchNormalization into the filters, fuses a
Relu that is the Conv's only consumer, draws each layer's hyperplanes from its own seeded
generator and replaces the Conv node in place, keeping its name and its output tensor name.
"""

from __future__ import annotations

import copy
import hashlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from haste_onnx import flops, ir, opdef
from haste_onnx.errors import InputError
from haste_onnx.hashing import check_num_planes, make_planes
from haste_onnx.passes.fold import as_initializer, fold_batchnorm, fold_constant_inputs

SUPPORTED_KERNELS = (1, 3, 5, 7)


@dataclass(frozen=True)
class HasteOptions:
    """Hyperparameters and policy. Defaults are the paper's CIFAR-10 setting."""

    num_planes: int = 14
    sparsity: float | None = 2 / 3
    tile: int = opdef.DEFAULT_TILE
    seed: int = 0
    min_channels: int = 8
    skip_first: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    layer_planes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            if isinstance(getattr(self, name), str):
                raise InputError(f"{name} takes a sequence of Conv names, not one string")
        for name in ("tile", "seed", "min_channels", "skip_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InputError(f"{name} = {value!r} must be an integer")
        if self.seed < 0:
            raise InputError(f"seed = {self.seed} must be >= 0")
        for name, value in {"L": self.num_planes, **self.layer_planes}.items():
            try:
                check_num_planes(value)
            except ValueError as exc:
                raise InputError(str(exc) if name == "L" else f"layer {name!r}: {exc}") from None
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:  # NaN too
            raise InputError(f"s (sparsity) = {self.sparsity} is out of range: allowed is [0, 1)")
        if not 1 <= self.tile <= opdef.MAX_TILE:
            allowed = f"[1, {opdef.MAX_TILE}]"
            raise InputError(f"tile (T) = {self.tile} is out of range: allowed is {allowed}")
        if self.skip_first < 0:
            raise InputError(f"skip_first = {self.skip_first} must be >= 0")
        if self.min_channels < 1:
            raise InputError(f"min_channels = {self.min_channels} must be >= 1")
        if both := sorted(set(self.include) & set(self.exclude)):
            raise InputError(f"{', '.join(both)}: both included and excluded")


@dataclass(frozen=True)
class ConvSite:
    """What the rules look at for one Conv node."""

    node: onnx.NodeProto
    index: int  # position in the graph's node list
    name: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    bias_missing: bool  # the bias input names a tensor that is not constant
    shortcut: bool = False  # a 1x1 projection shortcut of a residual block
    one_pixel: bool = False  # its input is a 1x1 map, as shape inference finds it
    weight_op: str = ""  # the op type of the node that computes a weight that is not constant


@dataclass(frozen=True)
class ConvDecision:
    """One Conv node of the original model and what happened to it."""

    name: str
    in_channels: int | None
    out_channels: int | None
    kernel: tuple[int, ...] | None
    converted: bool
    reason: str = ""


@dataclass(frozen=True)
class LayerPlan:
    """A HasteConv node written by the rewrite."""

    name: str
    input: str
    output: str
    in_channels: int
    out_channels: int
    kernel: int
    pads: tuple[int, int, int, int]
    tile: int
    num_planes: int
    projection_flops: int
    fused_batchnorm: bool | None  # None: not known (read back from a converted model)
    fused_relu: bool


Rule = Callable[[ConvSite], "str | None"]


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    return list(ir.attribute(node, name, default))  # type: ignore[call-overload]


def _is_2d(site: ConvSite) -> str | None:
    if site.weight is not None and site.weight.ndim != 4:
        return f"not a 2-D convolution (weight has rank {site.weight.ndim})"
    return None


def _group_one(site: ConvSite) -> str | None:
    group = ir.attribute(site.node, "group", 1)
    return None if group == 1 else f"group {group} (grouped or depthwise convolution)"


def _dilation_one(site: ConvSite) -> str | None:
    dilations = _ints(site.node, "dilations", [1, 1])
    return None if all(d == 1 for d in dilations) else f"dilations {dilations}"


def _stride_one(site: ConvSite) -> str | None:
    strides = _ints(site.node, "strides", [1, 1])
    return None if all(s == 1 for s in strides) else f"stride {strides} (downsampling)"


def _constant_weight(site: ConvSite) -> str | None:
    if site.weight is None and site.weight_op == "DequantizeLinear":
        return (
            "weight is dequantized at run time (a quantized model): HasteConv computes in "
            "float32, and would replace a quantized Conv"
        )
    if site.weight is None:
        return "weight is computed at run time, not a constant — HASTE needs constant filters"
    if site.bias_missing:
        return "bias is computed at run time, not a constant"
    if site.weight.dtype != np.float32:
        return f"weight is {site.weight.dtype}, HasteConv computes in float32"
    return None


def _supported_kernel(site: ConvSite) -> str | None:
    assert site.weight is not None
    kh, kw = site.weight.shape[2:]
    if kh != kw or kh not in SUPPORTED_KERNELS:
        return f"kernel {kh}x{kw} (supported: square {', '.join(map(str, SUPPORTED_KERNELS))})"
    return None


def _explicit_pads(node: onnx.NodeProto, kernel: int) -> tuple[int, int, int, int] | None:
    auto_pad = ir.attribute(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        lo, hi = (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2
        if auto_pad == "SAME_LOWER":
            lo, hi = hi, lo
        return (lo, lo, hi, hi)
    pads = _ints(node, "pads", [0, 0, 0, 0])
    return (pads[0], pads[1], pads[2], pads[3]) if len(pads) == 4 else None


def _padding(site: ConvSite) -> str | None:
    assert site.weight is not None
    pads = _explicit_pads(site.node, site.weight.shape[2])
    if pads is None or min(pads) < 0:
        return f"unsupported padding {_ints(site.node, 'pads', [])}"
    return None


HARD_RULES: tuple[Rule, ...] = (
    _constant_weight,
    _is_2d,
    _group_one,
    _dilation_one,
    _stride_one,
    _supported_kernel,
    _padding,
)
"""Rules no option overrides: the operator cannot run the node otherwise."""


def _sites(model: onnx.ModelProto) -> list[ConvSite]:
    graph = model.graph
    convs = [
        (i, n)
        for i, n in enumerate(graph.node)
        if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
    ]
    wanted = {
        name
        for _, n in convs
        for name in n.input[1:3]
        if name and ir.constant_value(graph, name) is None
    }
    folded = fold_constant_inputs(model, wanted)
    names = {n.name for n in graph.node if n.name}  # an unnamed Conv's name must be new
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for input_name in set(ir.reads(n)):
            users.setdefault(input_name, []).append(n)
    pixels = _one_pixel_maps(model)
    producers = {out: n.op_type for n in graph.node for out in n.output}
    sites = []
    for index, node in convs:

        def value(name: str) -> np.ndarray | None:
            v = ir.constant_value(graph, name)
            return folded.get(name) if v is None else v

        weight = value(node.input[1])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = value(node.input[2]) if has_bias else None
        name = node.name or ir.unique_name(names, f"Conv_{index}({node.output[0]})")
        shortcut = weight is not None and weight.shape[2:] == (1, 1)
        shortcut = shortcut and _projection_shortcut(graph, node, users)
        missing = has_bias and bias is None
        one_pixel = node.input[0] in pixels
        weight_op = producers.get(node.input[1], "") if weight is None else ""
        sites.append(
            ConvSite(node, index, name, weight, bias, missing, shortcut, one_pixel, weight_op)
        )
    return sites


def _one_pixel_maps(model: onnx.ModelProto) -> set[str]:
    """The tensors that shape inference finds to be [N, C, 1, 1]: after a global pooling, as
    the squeeze-and-excitation blocks of EfficientNet and MobileNetV3 have them, or at the end of
    a model exported for a small input size."""
    try:
        inferred = onnx.shape_inference.infer_shapes(ir.shapes_only(model))
    except Exception:  # onnx raises many types; no shapes, no such maps
        return set()
    graph = inferred.graph
    return {
        value.name
        for value in [*graph.input, *graph.value_info]
        if len(dims := value.type.tensor_type.shape.dim) == 4
        and all(d.HasField("dim_value") and d.dim_value == 1 for d in dims[2:])
    }


_RESAMPLING = frozenset({"Resize", "Upsample", "MaxPool", "AveragePool", "GlobalAveragePool"})


def _projection_shortcut(
    graph: onnx.GraphProto, node: onnx.NodeProto, users: Mapping[str, list[onnx.NodeProto]]
) -> bool:
    """Whether a 1x1 Conv's output (through a BatchNormalization) is added to a residual
    branch that starts from the same input: a ResNet shortcut, which the paper leaves alone.
    The branch is a short path of nodes that keep the map's size (an FPN's lateral 1x1 Conv,
    added to a map that came down the backbone and was upsampled, is not a shortcut)."""
    out = node.output[0]
    if (bn := _sole_consumer(graph, out, "BatchNormalization")) is not None:
        out = graph.node[bn].output[0]
    adds = {id(u) for u in users.get(out, []) if u.op_type in ("Add", "Sum")}
    frontier, seen = [node.input[0]] if adds else [], set()
    for _ in range(16):  # nodes on the branch, at most
        step: list[str] = []
        for tensor in frontier:
            for user in users.get(tensor, []):
                if id(user) in adds:
                    return True
                strided = any(s != 1 for s in _ints(user, "strides", [1, 1]))
                if user is node or id(user) in seen or user.op_type in _RESAMPLING or strided:
                    continue
                seen.add(id(user))
                step.extend(name for name in user.output if name)
        frontier = step
    return False


def _check_names(sites: list[ConvSite], options: HasteOptions) -> None:
    known = {s.name for s in sites}
    for option, names in (
        ("include", options.include),
        ("exclude", options.exclude),
        ("layer planes", tuple(options.layer_planes)),
    ):
        unknown = sorted(set(names) - known)
        if unknown:
            listing = ", ".join(sorted(known)) or "none"
            raise InputError(
                f"{option}: no Conv named {', '.join(unknown)} (Conv nodes: {listing})"
            )


def decide(
    model: onnx.ModelProto, options: HasteOptions
) -> tuple[list[ConvSite], list[ConvDecision]]:
    """Apply the eligibility rules to every Conv of the main graph, in graph order."""
    sites = _sites(model)
    _check_names(sites, options)
    decisions = []
    eligible_seen = 0
    for site in sites:
        reason = next((r for rule in HARD_RULES if (r := rule(site))), None)
        forced = site.name in options.include
        if forced and reason is not None:  # --include overrides the policy, not these rules
            raise InputError(f"include: {site.name} cannot be converted: {reason}")
        c = None if site.weight is None or site.weight.ndim < 2 else int(site.weight.shape[1])
        if reason is None and site.name in options.exclude:
            reason = "excluded by the user"
        elif reason is None and not forced:
            assert c is not None
            if c < options.min_channels:
                reason = f"only {c} input channels (< {options.min_channels}): too few to merge"
            elif site.shortcut:
                reason = "1x1 projection shortcut of a residual block (left alone, as in the paper)"
            elif site.one_pixel:
                reason = (
                    "its input is a 1x1 map (a global pooling's, or a small input's): a patch "
                    "holds one pixel and padding, nothing worth merging, and hashing costs more "
                    "than it saves"
                )
            elif eligible_seen < options.skip_first:
                eligible_seen += 1
                reason = f"among the first {options.skip_first} eligible convs (skip_first)"
        w = site.weight
        decisions.append(
            ConvDecision(
                name=site.name,
                in_channels=c,
                out_channels=None if w is None else int(w.shape[0]),
                kernel=None if w is None else tuple(int(k) for k in w.shape[2:]),
                converted=reason is None,
                reason=reason or "",
            )
        )
    for d in decisions:  # an L for a layer left as Conv would be silently unused
        if d.name in options.layer_planes and not d.converted:
            raise InputError(
                f"layer planes: {d.name} is not converted ({d.reason}); drop its L or include it"
            )
    return sites, decisions


def layer_planes(options: HasteOptions, name: str, num_planes: int, patch: int) -> np.ndarray:
    """The hyperplanes of one layer: a generator seeded by the seed and the layer's name, so a
    layer's planes do not depend on which other layers are converted."""
    rng = np.random.default_rng([options.seed, zlib.crc32(name.encode())])
    return make_planes(num_planes, patch * patch, options.sparsity, rng)


def _sole_consumer(graph: onnx.GraphProto, name: str, op_type: str) -> int | None:
    """Index of the node of type ``op_type`` that is the only user of tensor ``name``."""
    users = [i for i, n in enumerate(graph.node) if name in ir.reads(n)]
    if len(users) != 1 or name in ir.graph_output_names(graph):
        return None
    node = graph.node[users[0]]
    return users[0] if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def rewrite(
    model: onnx.ModelProto, options: HasteOptions
) -> tuple[onnx.ModelProto, list[ConvDecision], list[LayerPlan]]:
    """Return a converted copy of ``model``, the decision for every Conv, and the layers made."""
    sites, decisions = decide(model, options)
    out = copy.deepcopy(model)
    graph = out.graph
    taken = ir.tensor_names(graph)
    drop: set[int] = set()
    plans = []
    made: dict[bytes, str] = {}  # the digest of each array made an initializer, and its name

    def initializer(array: np.ndarray, name: str) -> str:
        """The name of a new initializer holding ``array``; an equal one made before is shared
        (Convs that shared a weight keep sharing it)."""
        array = np.ascontiguousarray(array)
        digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes())
        key = digest.digest()
        if key not in made:
            made[key] = ir.unique_name(taken, name)
            graph.initializer.append(as_initializer(array, made[key]))
        return made[key]

    for site, decision in zip(sites, decisions):
        if not decision.converted:
            continue
        node = site.node
        assert site.weight is not None
        weight, bias = site.weight, site.bias
        output = node.output[0]
        bn = _sole_consumer(model.graph, output, "BatchNormalization")
        folded = None
        if bn is not None and len([o for o in graph.node[bn].output if o]) == 1:
            folded = fold_batchnorm(weight, bias, graph.node[bn], model.graph)
        if folded is not None:
            assert bn is not None
            weight, bias = folded
            output = graph.node[bn].output[0]
            drop.add(bn)
        relu = _sole_consumer(model.graph, output, "Relu")
        if relu is not None:
            output = graph.node[relu].output[0]
            drop.add(relu)
        k = int(weight.shape[2])
        num_planes = options.layer_planes.get(site.name, options.num_planes)
        planes = layer_planes(options, site.name, num_planes, options.tile + k - 1)
        base = node.name or node.output[0]
        w_name = initializer(weight, f"{base}.haste.weight")
        p_name = initializer(planes, f"{base}.haste.planes")
        b_name = None
        if bias is not None:
            b_name = initializer(bias.astype(np.float32), f"{base}.haste.bias")
        pads = _explicit_pads(node, k)
        assert pads is not None
        haste = opdef.make_node(
            node.input[0],
            w_name,
            p_name,
            output,
            bias=b_name,
            kernel=k,
            pads=pads,
            tile=options.tile,
            activation="Relu" if relu is not None else "",
            name=site.name,  # an unnamed Conv's too, so that the layer keeps its name in reports
        )
        graph.node[site.index].CopyFrom(haste)
        plans.append(
            LayerPlan(
                name=site.name,
                input=node.input[0],
                output=output,
                in_channels=int(weight.shape[1]),
                out_channels=int(weight.shape[0]),
                kernel=k,
                pads=pads,
                tile=options.tile,
                num_planes=num_planes,
                projection_flops=flops.projection_flops(planes),
                fused_batchnorm=folded is not None,
                fused_relu=relu is not None,
            )
        )
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    ir.remove_newly_dead_nodes(graph, ir.dead_outputs(model.graph))
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name not in produced]
    for v in stale:
        graph.value_info.remove(v)
    ir.remove_unused_initializers(graph)
    ir.declare_float_outputs(graph, [p.output for p in plans], model)
    # Before IR 4 every initializer is also listed as a graph input.
    former = {t.name for t in model.graph.initializer}
    ir.sync_initializer_inputs(graph, former, list_new=out.ir_version < 4)
    if plans and not any(o.domain == opdef.DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(opdef.DOMAIN, opdef.OPSET_VERSION))
    if plans:  # the model's own metadata kept, and where HasteConv comes from
        props = {p.key: p.value for p in out.metadata_props}
        onnx.helper.set_model_props(out, {**props, opdef.DOMAIN: opdef.RUNTIME_HINT})
    return out, decisions, plans


def plans_of(model: onnx.ModelProto) -> list[LayerPlan]:
    """The HasteConv layers of an already converted model, read back from its nodes: checked as
    far as reading them needs (onnxruntime checks the rest when it loads the model)."""
    graph = model.graph
    plans = []
    for index, node in enumerate(graph.node):
        if node.op_type != opdef.OP_TYPE or node.domain != opdef.DOMAIN:
            continue
        name = node.name or f"{opdef.OP_TYPE}_{index}({node.output[0] if node.output else ''})"
        weight, planes = _read_back(graph, node, name)
        pads = _ints(node, "pads", [0, 0, 0, 0])
        plans.append(
            LayerPlan(
                name=name,
                input=node.input[0],
                output=node.output[0],
                in_channels=int(weight.shape[1]),
                out_channels=int(weight.shape[0]),
                kernel=int(weight.shape[2]),
                pads=(pads[0], pads[1], pads[2], pads[3]),
                tile=int(ir.attribute(node, "tile", opdef.DEFAULT_TILE)),  # type: ignore[call-overload]
                num_planes=int(planes.shape[0]),
                projection_flops=flops.projection_flops(planes),
                fused_batchnorm=None,
                fused_relu=ir.attribute(node, "activation", "") == "Relu",
            )
        )
    return plans


def _read_back(
    graph: onnx.GraphProto, node: onnx.NodeProto, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """W and planes of HasteConv ``node``, once its inputs and attributes have the types and
    ranks a LayerPlan reads (InputError otherwise: a model edited by hand)."""

    def bad(what: str) -> InputError:
        return InputError(f"HasteConv {name!r} {what}: is this model as haste-onnx wrote it?")

    if len(node.input) != 4 or len(node.output) != 1:
        raise bad(
            f"has {len(node.input)} inputs and {len(node.output)} outputs, where it takes X, W, "
            "B (an empty name when there is none) and planes, and gives Y"
        )
    weight, bias, planes = (ir.constant_value(graph, i) if i else None for i in node.input[1:])
    if weight is None or planes is None or (node.input[2] and bias is None):
        raise bad("reads W, B or planes from something other than a constant")
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3] or planes.ndim != 2:
        raise bad(
            f"has W of shape {list(weight.shape)} and planes of shape {list(planes.shape)}, "
            "where they are [M, C, K, K] and [L, P*P]"
        )
    pads = ir.attribute(node, "pads", [0, 0, 0, 0])
    if not isinstance(pads, list) or len(pads) != 4 or not all(isinstance(p, int) for p in pads):
        raise bad(f"has pads {pads!r}, where they are four integers")
    tile = ir.attribute(node, "tile", opdef.DEFAULT_TILE)
    if not isinstance(tile, int) or tile < 1:
        raise bad(f"has tile {tile!r}, where it is a positive integer")
    activation = ir.attribute(node, "activation", "")
    if activation not in opdef.ACTIVATIONS:
        raise bad(f"has activation {activation!r}, where it is one of {opdef.ACTIVATIONS}")
    return weight, planes
