"""Accuracy against FLOPs on a real trained network and real labeled images (fast version of the
documented sweep): more planes keep more accuracy and save fewer FLOPs, and LSH beats random
grouping at the same bucket sizes by a wide margin."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator
from test_custom_op import haste_model

from haste_onnx import datasets
from haste_onnx.evaluate import (
    Row,
    Run,
    _random_grouping_op,
    ablation,
    evaluate,
    random_grouping_conv,
)
from haste_onnx.hashing import make_planes
from haste_onnx.passes.rewrite import HasteOptions
from haste_onnx.reference import haste_conv

ROOT = Path(__file__).parent.parent
MODEL = ROOT / "models" / "fashion" / "resnet18_fashion.onnx"
DATA = Path(__file__).parent / "data" / "fashion_mnist_test_500.npz"
MEAN, STD = 0.2860 * 255, 0.3530 * 255  # the training script's normalisation


@pytest.fixture(scope="module")
def fashion():
    images, labels = datasets.load_npz(DATA)
    return onnx.load(MODEL), datasets.normalize(images, MEAN, STD)[:300], labels[:300]


def test_accuracy_recovers_and_savings_fall_as_planes_grow(fashion):
    model, images, labels = fashion
    ev = evaluate(model, images, labels, "fashion", planes=(4, 16), seeds=(0,), stats_images=100)
    few, many = ev.rows
    assert ev.baseline_accuracy > 0.85  # the trained network really classifies
    assert few.accuracy[0] < ev.baseline_accuracy - 0.2  # L = 4 merges far too much
    assert many.accuracy[0] > ev.baseline_accuracy - 0.03  # L = 16 is close to the baseline
    assert few.reduction[0] > many.reduction[0] + 0.1
    assert few.mean_ratio[0] > many.mean_ratio[0]
    assert many.reduction[0] > 0.15  # and still saves real FLOPs


def test_lsh_beats_random_grouping_at_the_same_ratio(fashion):
    model, images, labels = fashion
    result = ablation(model, HasteOptions(num_planes=10), images[:60], labels[:60])
    assert result.mean_ratio > 0.4  # many channels merge
    assert result.lsh_accuracy > 0.8
    assert result.lsh_accuracy - result.random_accuracy > 0.4
    assert np.isfinite(result.random_accuracy)


def test_random_grouping_keeps_bucket_sizes():
    """With all-distinct buckets or a single bucket, random membership changes nothing, so the
    ablation's operator must then equal HasteConv itself: as a function, and as the node (its
    bias and fused Relu) that the ablation runs through the ReferenceEvaluator."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 12, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    for num_planes in (0, 63):
        planes = make_planes(num_planes, 25, rng=1)
        expect = haste_conv(x, w, planes, b, pads=(1, 1, 1, 1), relu=True)
        assert (expect == 0).any()  # the Relu clips
        got = random_grouping_conv(x, w, planes, b, (1, 1, 1, 1), 3, True, rng)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
        model = haste_model(w, planes, b, pads=(1, 1, 1, 1), activation="Relu")
        evaluator = ReferenceEvaluator(model, new_ops=[_random_grouping_op(0)])
        np.testing.assert_allclose(evaluator.run(None, {"X": x})[0], expect, rtol=1e-5, atol=1e-5)
    few = make_planes(2, 25, rng=1)  # real merges: random members must differ from LSH's
    assert not np.allclose(
        random_grouping_conv(x, w, few, b, (1, 1, 1, 1), 3, True, rng),
        haste_conv(x, w, few, b, pads=(1, 1, 1, 1), relu=True),
        atol=1e-3,
    )


def test_a_bad_l_fails_before_the_sweep_starts(fashion):
    model, images, labels = fashion
    said = []
    with pytest.raises(ValueError, match="99 is out of range"):
        evaluate(model, images[:4], labels[:4], "fashion", planes=(8, 99), progress=said.append)
    assert said == []  # not even the baseline ran


def test_images_that_do_not_fit_the_model_fail_before_the_sweep(fashion):
    model, images, labels = fashion
    with pytest.raises(ValueError, match=r"the images are \[4, 1, 14, 14\], the model's input"):
        evaluate(model, images[:4, :, ::2, ::2], labels[:4], "fashion", planes=(8,))


def test_labels_beyond_the_model_s_classes_are_refused(fashion):
    model, images, labels = fashion
    with pytest.raises(ValueError, match="the labels run from 0 to 10, the model has 10 classes"):
        evaluate(model, images[:4], np.array([0, 1, 2, 10]), "fashion", planes=(8,))


def test_a_model_that_does_not_classify_is_refused(fashion):
    model, images, labels = fashion
    features = onnx.ModelProto()
    features.CopyFrom(model)
    first_conv = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    del features.graph.output[:]
    features.graph.output.append(
        onnx.helper.make_tensor_value_info(first_conv, onnx.TensorProto.FLOAT, None)
    )
    with pytest.raises(ValueError, match="first output is \\[N, classes\\], this model's is"):
        evaluate(features, images[:4], labels[:4], "fashion", planes=(8,))


def test_a_model_with_a_fixed_batch_runs_in_batches_of_its_size(fashion):
    model, images, labels = fashion
    one = onnx.ModelProto()
    one.CopyFrom(model)
    one.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    result = evaluate(one, images[:3], labels[:3], "fashion", planes=(14,), seeds=(0,))
    assert len(result.rows) == 1 and 0.0 <= result.baseline_accuracy <= 1.0
    two = onnx.ModelProto()
    two.CopyFrom(one)
    two.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(ValueError, match="batches of exactly 2 images, and 3 is not a multiple"):
        evaluate(two, images[:3], labels[:3], "fashion", planes=(14,))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no images", "no images to evaluate on"),
        ("nan images", "NaN or infinite"),
        ("no eligible conv", "no Conv of the model is eligible"),
        ("labels short", "4 images but 3 labels"),
        ("an L twice", "L = 14 given twice"),
        ("no seeds", "no seeds"),
        ("no stats images", "stats_images = 0 must be >= 1"),
        ("negative ablation", "ablation_images = -1 >= 0"),
    ],
)
def test_evaluation_that_could_only_mislead_is_refused(fashion, case, message):
    model, images, labels = fashion
    images, labels = images[:4].copy(), labels[:4]
    options = HasteOptions(min_channels=100000) if case == "no eligible conv" else None
    sweep = {"planes": (14,)} | {
        "no seeds": {"seeds": ()},
        "no stats images": {"stats_images": 0},
        "negative ablation": {"ablation_images": -1},
        "an L twice": {"planes": (14, 8, 14)},
    }.get(case, {})
    if case == "no images":
        images, labels = images[:0], labels[:0]
    if case == "nan images":
        images[1, 0, 3, 3] = np.nan
    if case == "labels short":
        labels = labels[:3]
    with pytest.raises(ValueError, match=message):
        evaluate(model, images, labels, "fashion", options=options, **sweep)


def test_std_over_seeds_has_ddof_0():
    def run(accuracy: float) -> Run:
        return Run(8, 0, accuracy, 0.5, 0.5, {})

    assert Row(8, [run(0.5), run(0.7)]).accuracy == pytest.approx((0.6, 0.1))
    assert Row(8, [run(0.5)]).accuracy == (0.5, 0.0)
