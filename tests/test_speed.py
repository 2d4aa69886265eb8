"""`convert(only_faster=True)` and the layer timing behind it (selection and models, not speed)."""

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from oracles import conv2d

from haste_onnx import ir, opdef, speed
from haste_onnx.errors import InputError, NothingFaster
from haste_onnx.passes.rewrite import HasteOptions, rewrite
from haste_onnx.pipeline import convert
from haste_onnx.runtime import make_session

EXAMPLE = Path(__file__).parent.parent / "models" / "example.onnx"


def haste_outputs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.domain == opdef.DOMAIN]


def timing(ratio: float, wins: int = 9) -> speed.Comparison:
    """A timing of nine rounds: faster (a lower median, and 8 or 9 rounds won) or not."""
    return speed.Comparison(ratio, wins, 9)


def every_layer_timed(monkeypatch: pytest.MonkeyPatch, comparison: speed.Comparison) -> None:
    """time_layers finds every converted layer alone ``comparison``."""
    monkeypatch.setattr(
        speed,
        "time_layers",
        lambda model, feeds, **kw: dict.fromkeys(haste_outputs(model), comparison),
    )


def test_faster_means_beyond_chance():
    """A one-sided sign test at 5 %: of nine rounds, eight won are needed (seven or more happen
    by chance 9 % of the time); of seven, all seven; and the median must be lower too."""
    assert timing(0.9, 8).faster and timing(0.9, 9).faster
    assert not timing(0.9, 7).faster and not timing(0.5, 5).faster
    assert speed.Comparison(0.9, 7, 7).faster and not speed.Comparison(0.9, 6, 7).faster
    assert not timing(1.0, 9).faster
    assert str(timing(0.875, 8)) == "0.88, faster in 8 of 9 rounds"


def test_compare_counts_the_rounds_won(monkeypatch):
    samples = [[1.0, 3.0, 1.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]]
    monkeypatch.setattr(speed, "interleaved_samples", lambda runs, rounds: samples)
    assert speed.compare(lambda: None, lambda: None, 5) == speed.Comparison(0.5, 3, 5)


def test_interleaved_samples_take_turns_in_a_fixed_order():
    """Each run always follows the other: none runs twice in a row with its data still cached."""
    calls = []
    ticks = itertools.count()  # a clock on which every call lasts long: one call per sample
    runs = [lambda: calls.append("a"), lambda: calls.append("b")]
    speed.interleaved_samples(runs, 4, clock=lambda: next(ticks))
    assert "".join(calls) == "abab" + "abababab"  # warm-up, calibration, then four rounds


def test_layer_models_are_the_layer_as_conv_and_as_hasteconv():
    converted, _, plans = rewrite(onnx.load(EXAMPLE), HasteOptions())
    nodes = [n for n in converted.graph.node if n.domain == opdef.DOMAIN]
    assert len(nodes) == len(plans) == 4
    rng = np.random.default_rng(0)
    for node, plan in zip(nodes, plans):
        conv_model, haste_model = speed.layer_models(converted, node)
        onnx.checker.check_model(conv_model, full_check=True)
        w = ir.constant_value(converted.graph, node.input[1])
        b = ir.constant_value(converted.graph, node.input[2]) if node.input[2] else 0.0
        x = rng.standard_normal((2, plan.in_channels, 11, 13)).astype(np.float32)
        want = conv2d(x, w, plan.pads) + np.reshape(b, (-1, 1, 1))
        if plan.fused_relu:
            want = np.maximum(want, 0)
        got = make_session(conv_model).run(None, {"X": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        (haste,) = haste_model.graph.node  # the node itself, on X
        assert (haste.op_type, haste.domain) == (node.op_type, node.domain)
        assert list(haste.attribute) == list(node.attribute)
        assert haste.input[1:] == node.input[1:]
        assert make_session(haste_model).run(None, {"X": x})[0].shape == want.shape
    assert any(p.fused_relu for p in plans) and not all(p.fused_relu for p in plans)


def test_time_layers_times_every_hasteconv_node():
    converted, _, _ = rewrite(onnx.load(EXAMPLE), HasteOptions())
    feeds = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    timings = speed.time_layers(converted, feeds, rounds=2)
    assert sorted(timings) == sorted(haste_outputs(converted))
    for t in timings.values():
        assert np.isfinite(t.ratio) and t.ratio > 0 and 0 <= t.wins <= t.rounds == 2


def test_time_model_times_both_models():
    original = onnx.load(EXAMPLE)
    converted, _, _ = rewrite(original, HasteOptions())
    feeds = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    t = speed.time_model(original, converted, feeds, rounds=2)
    assert np.isfinite(t.ratio) and t.ratio > 0 and 0 <= t.wins <= t.rounds == 2
    t = speed.time_model(converted, converted, feeds, rounds=2)  # a converted baseline too
    assert np.isfinite(t.ratio) and t.rounds == 2


@pytest.mark.parametrize("rounds, threads", [(0, 1), (2, 0)])
def test_timing_refuses_no_rounds_and_no_threads(rounds, threads):
    original = onnx.load(EXAMPLE)
    converted, _, _ = rewrite(original, HasteOptions())
    feeds = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    message = f"rounds = {rounds} and threads = {threads} must be >= 1"
    with pytest.raises(InputError, match=message):
        speed.time_model(original, converted, feeds, rounds=rounds, threads=threads)
    with pytest.raises(InputError, match=message):
        speed.time_layers(converted, feeds, rounds=rounds, threads=threads)


def test_only_faster_keeps_the_layers_that_are_not_faster_as_conv(tmp_path, monkeypatch):
    timed = []

    def fake_ratios(model, feeds, **kwargs):  # the first layer is slower, the others faster
        outputs = haste_outputs(model)
        timed.append(outputs)
        return {name: timing(1.5 if i == 0 else 0.5) for i, name in enumerate(outputs)}

    monkeypatch.setattr(speed, "time_layers", fake_ratios)
    monkeypatch.setattr(speed, "time_model", lambda original, converted, feeds, **kw: timing(0.875))
    out = tmp_path / "example.haste.onnx"
    result = convert(EXAMPLE, out, only_faster=True)
    assert result.timing == timing(0.875)
    assert len(timed) == 1 and len(timed[0]) == 4
    assert result.passed, result.verification.failures
    assert [p.name for p in result.layers] == ["block.conv1", "block.conv2", "layer2"]
    kept = next(d for d in result.decisions if d.name == "layer1")
    assert not kept.converted and "not faster" in kept.reason and "1.50" in kept.reason
    assert [layer.time_ratio for layer in result.flops.layers] == [0.5, 0.5, 0.5]
    model = onnx.load(out)
    assert len(haste_outputs(model)) == 3
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 3  # stem, layer1, down


def test_only_faster_puts_back_an_included_layer_with_its_own_l(tmp_path, monkeypatch):
    def fake_ratios(model, feeds, **kwargs):  # the first layer is slower, the others faster
        return {name: timing(1.5 if i == 0 else 0.5) for i, name in enumerate(haste_outputs(model))}

    monkeypatch.setattr(speed, "time_layers", fake_ratios)
    monkeypatch.setattr(speed, "time_model", lambda original, converted, feeds, **kw: timing(0.9))
    options = HasteOptions(include=("layer1",), layer_planes={"layer1": 6, "layer2": 5})
    result = convert(EXAMPLE, tmp_path / "out.onnx", options, only_faster=True)
    assert [p.name for p in result.layers] == ["block.conv1", "block.conv2", "layer2"]
    assert [p.num_planes for p in result.layers] == [14, 14, 5]
    kept = next(d for d in result.decisions if d.name == "layer1")
    assert not kept.converted and "not faster" in kept.reason


def test_only_faster_keeps_as_conv_a_layer_faster_only_by_chance(tmp_path, monkeypatch):
    """A lower median that won 6 of 9 rounds is within the machine's noise: the layer stays
    Conv, and its reason says so."""
    monkeypatch.setattr(
        speed,
        "time_layers",
        lambda model, feeds, **kw: {
            name: timing(0.95, 6) if i == 0 else timing(0.5)
            for i, name in enumerate(haste_outputs(model))
        },
    )
    monkeypatch.setattr(speed, "time_model", lambda original, converted, feeds, **kw: timing(0.9))
    result = convert(EXAMPLE, tmp_path / "example.haste.onnx", only_faster=True)
    assert [p.name for p in result.layers] == ["block.conv1", "block.conv2", "layer2"]
    (kept,) = [d for d in result.decisions if d.name == "layer1"]
    assert (
        kept.reason
        == "not faster as HasteConv here (time / Conv time 0.95, faster in 6 of 9 rounds)"
    )


def test_only_faster_with_no_faster_layer_writes_nothing(tmp_path, monkeypatch):
    every_layer_timed(monkeypatch, timing(2.0, 0))
    out = tmp_path / "example.haste.onnx"
    with pytest.raises(NothingFaster, match="each layer alone: layer1 2.00, block.conv1 2.00"):
        convert(EXAMPLE, out, only_faster=True)
    assert not out.exists()


def test_cli_only_faster_reports_the_timed_reason(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from haste_onnx.cli.main import main

    monkeypatch.setattr(
        speed,
        "time_layers",
        lambda model, feeds, **kw: (
            dict.fromkeys(haste_outputs(model)[:1], timing(1.25, 1))
            | dict.fromkeys(haste_outputs(model)[1:], timing(0.75))
        ),
    )
    monkeypatch.setattr(
        speed, "time_model", lambda original, converted, feeds, **kw: timing(0.875, 8)
    )
    src = tmp_path / "example.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    result = CliRunner().invoke(main, ["convert", str(src), "--only-faster", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert (
        "converted model time / original model time: 0.88, faster in 8 of 9 rounds" in result.stderr
    )
    assert "fewer FLOPs is not less time" not in result.stderr  # it was timed: no need to say
    report = json.loads(result.stdout)
    assert (report["time_ratio"], report["time_wins"], report["time_rounds"]) == (0.875, 8, 9)
    assert [layer["time_ratio"] for layer in report["layers"]] == [0.75, 0.75, 0.75]
    (skipped,) = [s for s in report["skipped"] if s["name"] == "layer1"]
    assert skipped["reason"] == (
        "not faster as HasteConv here (time / Conv time 1.25, faster in 1 of 9 rounds)"
    )
    assert len(haste_outputs(onnx.load(tmp_path / "example.haste.onnx"))) == 3


def test_only_faster_drops_layers_until_the_whole_model_is_faster(tmp_path, monkeypatch):
    """Every layer is faster alone, but the model is faster as a whole only with at most two
    of them: the layers that saved least alone go back to Conv, one at a time."""
    alone = {}

    def fake_ratios(model, feeds, **kwargs):
        alone.update({name: timing(0.5 + 0.1 * i) for i, name in enumerate(haste_outputs(model))})
        return dict(alone)

    timed = []

    def fake_model_ratio(original, converted, feeds, **kwargs):
        timed.append(len(haste_outputs(converted)))
        return timing(0.9) if timed[-1] <= 2 else timing(1.05, 2)

    monkeypatch.setattr(speed, "time_layers", fake_ratios)
    monkeypatch.setattr(speed, "time_model", fake_model_ratio)
    out = tmp_path / "example.haste.onnx"
    result = convert(EXAMPLE, out, only_faster=True)
    assert timed == [4, 3, 2]
    assert result.timing == timing(0.9)
    assert [p.name for p in result.layers] == ["layer1", "block.conv1"]
    dropped = {d.name: d.reason for d in result.decisions if d.name in ("block.conv2", "layer2")}
    assert all("not faster in the whole model" in r and "1.05" in r for r in dropped.values())
    assert "alone 0.80" in dropped["layer2"] and "alone 0.70" in dropped["block.conv2"]
    assert len(haste_outputs(onnx.load(out))) == 2


def test_only_faster_writes_nothing_when_the_whole_model_is_never_faster(tmp_path, monkeypatch):
    every_layer_timed(monkeypatch, timing(0.5))
    monkeypatch.setattr(
        speed, "time_model", lambda original, converted, feeds, **kw: timing(1.01, 4)
    )
    out = tmp_path / "example.haste.onnx"
    with pytest.raises(NothingFaster, match="nothing is written") as error:
        convert(EXAMPLE, out, only_faster=True)
    assert str(error.value).count(" 0.50") == 4  # each layer's time alone
    assert "those faster alone did not make the whole model faster" in str(error.value)
    assert not out.exists()


def test_cli_exits_3_when_only_faster_keeps_no_layer(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from haste_onnx.cli.main import main

    every_layer_timed(monkeypatch, timing(1.2, 0))
    src = tmp_path / "example.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    result = CliRunner().invoke(
        main, ["convert", str(src), "--only-faster", "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 3, result.output
    assert "no layer of" in result.output and "layer1 1.20" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.onnx"]  # nothing written


def test_timing_with_threads_does_not_spin(monkeypatch):
    """Interleaved, an idle session's spinning workers would take cores from the timed one: with
    more than one thread both sides sleep when out of work; with one there are no workers."""
    made = []
    real = speed.runtime.quiet_session

    def spy(model, **kwargs):
        session = real(model, **kwargs)
        made.append(session.get_session_options())
        return session

    monkeypatch.setattr(speed.runtime, "quiet_session", spy)
    original = onnx.load(EXAMPLE)
    converted, _, _ = rewrite(original, HasteOptions())
    feeds = {"input": np.zeros((1, 3, 32, 32), np.float32)}

    def spinning(options) -> str:
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return "default"

    for threads, expected in [(2, "0"), (1, "default")]:
        made.clear()
        speed.time_model(original, converted, feeds, rounds=1, threads=threads)
        speed.time_layers(converted, feeds, rounds=1, threads=threads)
        timed = [o for o in made if o.intra_op_num_threads == threads]
        assert len(timed) == 2 + 2 * 4  # both models, then both sides of the four layers
        assert {spinning(o) for o in timed} == {expected}


def test_only_faster_times_both_sides_with_the_threads_asked_for(tmp_path, monkeypatch):
    seen = []

    def fake_ratios(model, feeds, threads=1, **kwargs):
        seen.append(("layers", threads))
        return dict.fromkeys(haste_outputs(model), timing(0.5))

    def fake_model_ratio(original, converted, feeds, threads=1, **kwargs):
        seen.append(("model", threads))
        return timing(0.9)

    monkeypatch.setattr(speed, "time_layers", fake_ratios)
    monkeypatch.setattr(speed, "time_model", fake_model_ratio)
    result = convert(EXAMPLE, tmp_path / "example.haste.onnx", only_faster=True, threads=2)
    assert result.timing == timing(0.9)
    assert seen == [("layers", 2), ("model", 2)]


def test_cli_threads_only_with_only_faster(tmp_path):
    from click.testing import CliRunner
    from haste_onnx.cli.main import main

    src = tmp_path / "example.onnx"
    src.write_bytes(EXAMPLE.read_bytes())
    result = CliRunner().invoke(main, ["convert", str(src), "--threads", "2"])
    assert result.exit_code == 2
    assert "--threads applies to --only-faster" in result.output
    assert not (tmp_path / "example.haste.onnx").exists()


def test_time_layers_times_each_hasteconv_layer_first_on_its_own_input(monkeypatch) -> None:
    """compare(haste, conv) gets the HasteConv layer first (its ratio is HasteConv / Conv), both
    sides with the threads asked for, and each layer fed the tensor it reads when the whole
    model runs on the feeds (not the model's input)."""
    example = Path(__file__).parent.parent / "models" / "example.onnx"
    converted, _, _ = rewrite(onnx.load(example), HasteOptions())
    nodes = [n for n in converted.graph.node if n.domain == opdef.DOMAIN]
    rng = np.random.default_rng(44)
    feeds = {"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
    inputs = make_session(ir.with_outputs(converted, [n.input[0] for n in nodes])).run(
        [n.input[0] for n in nodes], feeds
    )

    class Side:
        def __init__(self, model, threads, custom_ops=True):
            self.haste = custom_ops and any(n.domain == opdef.DOMAIN for n in model.graph.node)
            self.threads = threads

        def run(self, names, feed):
            return self, feed

    calls = []
    monkeypatch.setattr(speed, "_timed_session", Side)

    def compare(haste, conv, rounds):
        calls.append((haste(), conv()))
        return speed.Comparison(0.5, 2, 2)

    monkeypatch.setattr(speed, "compare", compare)
    timings = speed.time_layers(converted, feeds, rounds=2, threads=2)
    assert list(timings) == [n.output[0] for n in nodes] and len(calls) == len(nodes)
    for ((first, feed_a), (second, feed_b)), x in zip(calls, inputs):
        assert first.haste and not second.haste
        assert first.threads == second.threads == 2
        np.testing.assert_array_equal(feed_a["X"], x)
        np.testing.assert_array_equal(feed_b["X"], x)
