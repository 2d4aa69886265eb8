"""The ``haste-onnx`` command: parse options, call the library, print, set the exit code.

Exit codes: 0 success, 1 fidelity failure, 2 bad usage or input, 3 nothing to write (--only-faster
kept no layer), 130 interrupted, 141 the reader of the output went away.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from haste_onnx.cli import honored, interrupted
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from haste_onnx import datasets, ir, opdef, report
from haste_onnx import evaluate as evaluation
from haste_onnx import pipeline as api
from haste_onnx.errors import HasteError, InputError, NothingFaster
from haste_onnx.passes.rewrite import HasteOptions
from haste_onnx.staging import Staging, check_writable, real, real_destination
from haste_onnx.verify import Tolerances, Verification

EXIT_FIDELITY, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 130: the shells' code for Ctrl-C
EXIT_BROKEN_PIPE = 141  # the shells' code for a process ended by SIGPIPE
EXIT_NOTHING_FASTER = 3  # convert --only-faster kept no layer: nothing to write, no error either


def _pairs(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    result = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        if not sep or not name or not number.lstrip("-").isdigit():
            raise click.BadParameter(f"expected NAME=INTEGER, got {value!r}")
        result[name] = int(number)
    return result


def _sparsity(_ctx: click.Context, _param: click.Parameter, value: str) -> float | None:
    if value.lower() in ("dense", "none"):
        return None
    try:
        parts = [float(part) for part in value.split("/")]
        if len(parts) > 2:
            raise ValueError(value)
        number = parts[0] / parts[1] if len(parts) == 2 else parts[0]
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(
            f"expected a number in [0, 1), a fraction like 2/3, or 'dense', got {value!r}"
        ) from None
    if not 0.0 <= number < 1.0:
        raise click.BadParameter(f"{value} is outside [0, 1)")
    return number


class _Bound(click.FloatRange):
    """A float in a closed range, and never NaN (which every comparison lets through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value} is not a number", param, ctx)
        return number


class _Path(click.Path):
    """A path, refused when empty (an unset variable in a script): Path("") is ".", which would
    be taken for the current directory."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("the path is empty", param, ctx)
        return super().convert(value, param, ctx)


class _NewFile(_Path):
    """The path of a file to write, refused when a trailing '/' says it is meant as a directory
    (a Path drops that '/', and a file of that name would be written)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value} names a directory; give a file name", param, ctx)
        return super().convert(value, param, ctx)


def _stack(*options: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One decorator applying ``options`` in order, so shared options are defined once."""

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


_plane_options = _stack(
    click.option(
        "-L",
        "--planes",
        "num_planes",
        type=click.IntRange(0, 63),
        default=14,
        show_default=True,
        help="Hyperplanes per layer (hash code bits).",
    ),
    click.option(
        "--layer-planes",
        multiple=True,
        callback=_pairs,
        metavar="NAME=L",
        help="L for one layer, by Conv name; repeatable.",
    ),
    click.option(
        "--seed",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Seed of the hyperplanes and of the random verification inputs.",
    ),
)
"""How many planes each converted layer gets, and their seed (convert and inspect)."""

_policy_options = _stack(
    click.option(
        "-s",
        "--sparsity",
        default="2/3",
        show_default=True,
        callback=_sparsity,
        help="Share of zero entries in the planes, or 'dense' for Gaussian planes.",
    ),
    click.option(
        "-T",
        "--tile",
        type=click.IntRange(1, opdef.MAX_TILE),
        default=3,
        show_default=True,
        help="Output tile edge.",
    ),
    click.option(
        "--min-channels",
        type=click.IntRange(1),
        default=8,
        show_default=True,
        help="Leave convs with fewer input channels alone.",
    ),
    click.option(
        "--skip-first",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Leave the first N eligible convs alone.",
    ),
    click.option(
        "--include",
        multiple=True,
        metavar="NAME",
        help="Convert this Conv even if the policy (min channels, skip first, "
        "projection shortcuts) would leave it; repeatable.",
    ),
    click.option(
        "--exclude",
        multiple=True,
        metavar="NAME",
        help="Never convert this Conv; repeatable.",
    ),
)
"""Which Convs are converted, and the operator's shape (convert, inspect, evaluate)."""


def _listing(kind: type) -> Callable[[click.Context, click.Parameter, str], tuple[Any, ...]]:
    """A click callback parsing a comma-separated list of ``kind``."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(v) for v in value.split(","))
        except ValueError:
            raise click.BadParameter(
                f"expected comma-separated {kind.__name__} values, got {value!r}"
            ) from None

    return parse


_scale_options = _stack(
    click.option(
        "--mean",
        default="0",
        callback=_listing(float),
        show_default=True,
        help="Subtracted from raw image pixels (0..255), one or one per channel.",
    ),
    click.option(
        "--std",
        default="255",
        callback=_listing(float),
        show_default=True,
        help="Divides raw image pixels after the mean, one or one per channel.",
    ),
)
"""How images become the model's input: (pixel - mean) / std."""


_input_options = _stack(
    click.option(
        "--inputs",
        type=_Path(),
        default=None,
        help="Run on these inputs: .npy, .npz (keys = input names) or an image "
        "folder. Default: seeded random tensors.",
    ),
    click.option(
        "--batch",
        type=click.IntRange(1),
        default=2,
        show_default=True,
        help="Batch size of random inputs with a dynamic first dimension.",
    ),
    click.option(
        "--dim",
        "dims",
        multiple=True,
        callback=_pairs,
        metavar="NAME=SIZE",
        help="Size of a named dynamic input dimension; repeatable.",
    ),
    _scale_options,
)


_output_options = _stack(
    click.option(
        "--json",
        "json_path",
        type=_NewFile(),
        default=None,
        help="Write the report as JSON to this file, or '-' for stdout "
        "(the table then goes to stderr).",
    ),
    click.option("-q", "--quiet", is_flag=True, help="Print only errors."),
)


_tolerance_options = _stack(
    click.option(
        "--min-cosine",
        type=_Bound(-1.0, 1.0),
        default=0.95,
        show_default=True,
        help="Least cosine similarity of each output to the original's.",
    ),
    click.option(
        "--max-rel-l2",
        type=_Bound(0.0),
        default=None,
        help="Largest relative L2 error of each output (off by default).",
    ),
    click.option(
        "--min-top1",
        type=_Bound(0.0, 1.0),
        default=None,
        help="Least top-1 agreement for [N, classes] outputs, and share of equal labels for "
        "integer outputs (off by default).",
    ),
)


def _to_stderr(text: str) -> None:
    """Print on stderr if it can take it: what the command does and writes, and its stdout, do
    not depend on that (with no stderr at all, click would print on stdout instead)."""
    if sys.stderr is None:  # started with it closed
        return
    try:
        click.echo(text, file=sys.stderr)
    except (OSError, ValueError):  # closed, full, or gone
        pass


class _Console:
    """Where human-readable text goes: stdout, or stderr when stdout carries JSON."""

    def __init__(self, quiet: bool, json_path: Path | None) -> None:
        self.quiet = quiet
        if quiet:  # matplotlib's warnings too (EPS has no transparency, ...)
            logging.getLogger("matplotlib").setLevel(logging.ERROR)
        self.beside_json = json_path == Path("-")  # the JSON goes to stdout, the text to stderr

    def echo(self, text: str = "") -> None:
        if self.quiet:
            return
        if self.beside_json:
            _to_stderr(text)
        else:  # a failure to print is the command's (141, or exit 2)
            click.echo(text)

    def progress(self, message: str) -> None:
        """Say what is being done."""
        if not self.quiet:
            _to_stderr(click.style(f"· {message}", dim=True))


def _start(
    kw: dict[str, Any],
    plot: Path | None = None,
    models: tuple[Path, ...] = (),
    files: tuple[Path, ...] = (),
) -> _Console:
    """The console of a command, once its report files (--json, --plot) are known to be
    writable, to overwrite neither each other nor the command's ``models`` (input and output,
    and their .data files) and other input ``files`` (--inputs too), and matplotlib to be there
    for --plot: a bad path fails before any work is done."""
    reports = {"--json": kw["json_path"], "--plot": plot}
    reports = {  # --json - is stdout; --plot - is a bad name, refused below
        option: path
        for option, path in reports.items()
        if path is not None and (option, path) != ("--json", Path("-"))
    }
    if not reports:  # nothing to check: the models' data files need not be read
        return _Console(kw["quiet"], kw["json_path"])
    # each file the command reads or writes, as it reads it or as writing it replaces it
    taken: dict[Path, str] = {}
    for model in models:
        for data in (model, model.with_name(model.name + ".data"), *ir.external_data_files(model)):
            what = f"the model {model}" if data == model else f"the data of the model {model}"
            taken.setdefault(real(data), what)
            taken.setdefault(real_destination(data), what)
    for file in (*files, kw.get("inputs")):
        if file is not None:
            taken.setdefault(real(file), f"the input file {file}")
    for option, path in reports.items():
        check_writable(path, option)
        written = real_destination(path)
        if written in taken:
            raise InputError(f"{option} {path} would overwrite {taken[written]}")
        taken[written] = f"the {option} file"
    if plot is not None:
        formats = report.plot_formats()
        if plot.suffix.lower().lstrip(".") not in formats:
            raise InputError(f"--plot {plot}: name a .png file (or {', '.join(sorted(formats))})")
    return _Console(kw["quiet"], kw["json_path"])


def _write_json(path: Path | None, document: dict[str, object], staging: Staging) -> None:
    if path is None:
        return
    text = report.dumps(document) + "\n"
    if path == Path("-"):  # once the files it names are in place
        staging.then(lambda: click.echo(text, nl=False))
        return
    staging.write(path, lambda staged: staged.write_text(text))


def _fail(message: str, code: int) -> None:
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    _to_stderr(click.style("error: ", fg="red", bold=True) + one_line)  # or the exit code alone
    sys.exit(code)


# What onnxruntime raises when it cannot load or run a model (its errors derive from Exception).
_ORT_ERRORS = tuple(
    error
    for error in vars(ort_state).values()
    if isinstance(error, type) and issubclass(error, Exception)
)


# click >= 8.2 raises it for a bare group (then it shows the help); older versions exit themselves.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    """Turns every expected error into one line and exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's, with its usage errors in one line too (click prints three)."""
        kwargs["standalone_mode"] = False  # click's errors come here instead of being printed
        try:
            return super().main(*args, **kwargs)
        except _NO_ARGS_IS_HELP as exc:  # bare `haste-onnx`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
            _fail(exc.format_message() + where, EXIT_USAGE)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:  # Ctrl-C or end of input while click itself reads
            honored()
            _fail("interrupted", EXIT_INTERRUPTED)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NothingFaster as exc:
            _fail(str(exc), EXIT_NOTHING_FASTER)
        except (HasteError, ValueError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except _ORT_ERRORS as exc:  # a model or an input that onnxruntime refuses
            _fail(f"onnxruntime: {str(exc).strip()}", EXIT_USAGE)
        except MemoryError:
            _fail("out of memory: the inputs or the model are too large here", EXIT_USAGE)
        except BrokenPipeError:  # the reader went away (`| head`): not click's exit 1 either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:  # a path or a stream the system refuses (a full stdout, ...)
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}", EXIT_USAGE)
        except KeyboardInterrupt:  # not click's "Aborted!" and exit 1, which means a failed check
            honored()
            _fail("interrupted (no file is left half-written)", EXIT_INTERRUPTED)


@click.group(cls=_Group)
@click.version_option(package_name="haste-onnx")
def main() -> None:
    """Make convolutional ONNX models cheaper with HASTE channel merging.

    Exit codes: 0 success, 1 fidelity failure, 2 bad usage or input, 3 --only-faster kept no
    layer (nothing written), 130 interrupted, 141 the reader of the output went away.
    """


def _commit(staging: Staging) -> None:
    """Moves the staged files into place, unless a signal came whose KeyboardInterrupt was
    dropped (``haste_onnx.cli.interrupted``): then nothing is written, and the command exits 130."""
    if interrupted():
        raise KeyboardInterrupt
    staging.commit()


def _options(kw: dict[str, Any]) -> HasteOptions:
    return HasteOptions(
        num_planes=kw.get("num_planes", HasteOptions.num_planes),
        sparsity=kw["sparsity"],
        tile=kw["tile"],
        seed=kw.get("seed", HasteOptions.seed),
        min_channels=kw["min_channels"],
        skip_first=kw["skip_first"],
        include=tuple(kw["include"]),
        exclude=tuple(kw["exclude"]),
        layer_planes=kw.get("layer_planes", {}),
    )


def _verify_options(kw: dict[str, Any]) -> api.VerifyOptions:
    return api.VerifyOptions(
        inputs=kw["inputs"],
        batch=kw["batch"],
        dims=kw["dims"],
        seed=kw["seed"],
        mean=kw["mean"],
        std=kw["std"],
    )


def _fidelity_lines(verification: Verification) -> list[str]:
    lines = []
    for out in verification.outputs:
        top1 = "" if out.top1 is None else f", top-1 agreement {out.top1:.1%}"
        lines.append(
            f"output {out.name}: cosine {out.cosine:.4f}, rel L2 {out.rel_l2:.4f}, "
            f"max abs {out.max_abs:.4g}{top1}"
        )
    worst = max((layer.kernel_mismatch for layer in verification.layers), default=0.0)
    lines.append(
        f"C++ kernel vs numpy reference: {len(verification.layers)} "
        f"layer{'s' if len(verification.layers) != 1 else ''}, "
        f"worst mismatch {worst:.4%} of outputs"
    )
    return lines


def _report(
    console: _Console,
    kw: dict[str, Any],
    flops: report.FlopsReport,
    verification: Verification,
    plot: Path | None,
    extra: dict[str, object],
    staging: Staging,
) -> None:
    """Stage the plot and the JSON, and the table and fidelity to print once they (and the
    model) are written: whatever happens to stdout cannot decide which files are."""
    lines = [report.table(flops), "", *_fidelity_lines(verification)]
    if plot is not None:
        report.plot(flops, plot, staging)
        lines.append(f"plot: {plot}")
    staging.then(lambda: console.echo("\n".join(lines)))
    _write_json(
        kw["json_path"],
        {
            **extra,
            "passed": verification.passed,
            "failures": verification.failures,
            "fidelity": [vars(o) for o in verification.outputs],
            "kernel_agreement": [
                {"name": r.name, "rel_l2": r.kernel_rel_l2, "mismatch": r.kernel_mismatch}
                for r in verification.layers
            ],
            **report.flops_json(flops),
        },
        staging,
    )


def _tolerances(kw: dict[str, Any]) -> Tolerances:
    return Tolerances(
        min_cosine=kw["min_cosine"], max_rel_l2=kw["max_rel_l2"], min_top1=kw["min_top1"]
    )


_plot_option = click.option(
    "--plot",
    type=_NewFile(),
    default=None,
    help="Also draw r and FLOPs per layer into this PNG (needs matplotlib).",
)


@main.command()
@click.argument("model", type=_Path())
@click.option(
    "-o",
    "--output",
    type=_NewFile(),
    default=None,
    help="Where to write the converted model. Default: MODEL with .haste.onnx.",
)
@click.option("--force", is_flag=True, help="Write the model even if verification fails.")
@click.option(
    "--only-faster",
    is_flag=True,
    help="Time each converted layer alone against onnxruntime's Conv on the verification "
    "inputs (--threads) and keep as Conv those not faster as HasteConv on this machine (a lower "
    "median and at least 8 of 9 alternating rounds won); then time "
    "the whole model, and while it is not faster than the original keep as Conv the layer that "
    "saved least. Nothing is written if no layer is left. The output depends on the machine, its "
    "load and the batch size.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads of both sides when --only-faster times them: the threads "
    "the model will run with.",
)
@_plot_option
@_plane_options
@_policy_options
@_input_options
@_tolerance_options
@_output_options
def convert(
    model: Path,
    output: Path | None,
    force: bool,
    only_faster: bool,
    threads: int,
    plot: Path | None,
    **kw: Any,
) -> None:
    """Rewrite eligible Convs of MODEL into HasteConv, verify, and report FLOPs."""
    if threads != 1 and not only_faster:
        raise click.UsageError("--threads applies to --only-faster's timing only")
    target = output or api.default_output(model)
    console = _start(kw, plot, (model, target))
    result = api.convert(
        model,
        target,
        _options(kw),
        _verify_options(kw),
        _tolerances(kw),
        force,
        progress=console.progress,
        only_faster=only_faster,
        threads=threads,
        write=False,
    )
    timing = result.timing
    with Staging() as staging:  # the model, the plot and the JSON: all of them or none
        written = []
        if result.passed or force:
            console.progress(f"writing {target}")
            written = api.stage(result, staging)
        _report(
            console,
            kw,
            result.flops,
            result.verification,
            plot,
            {
                "model": str(model),
                "output": [str(p) for p in written],
                "options": {k: kw[k] for k in ("num_planes", "sparsity", "tile", "seed")},
                "time_ratio": timing.ratio if timing else None,
                "time_wins": timing.wins if timing else None,
                "time_rounds": timing.rounds if timing else None,
            },
            staging,
        )
        _commit(staging)
    if timing:
        console.echo(
            f"converted model time / original model time: {timing} "
            f"({threads} thread{'s' if threads > 1 else ''}, on the verification inputs)"
        )
    if not result.passed:
        wrote = (
            f"written anyway (--force): {written[0]}"
            if written
            else "the model is not written (use --force to write it anyway)"
        )
        _fail(
            "fidelity check failed: " + "; ".join(result.verification.failures) + "; " + wrote,
            EXIT_FIDELITY,
        )
    console.echo(click.style(f"wrote {', '.join(map(str, written))}", fg="green"))
    if not only_faster:
        console.echo(
            "note: fewer FLOPs is not less time - on a CPU many HasteConv layers run slower than "
            "onnxruntime's Conv; --only-faster keeps only those that are faster on this machine"
        )


@main.command()
@click.argument("original", type=_Path())
@click.argument("converted", type=_Path())
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Seed of the random verification inputs.",
)
@_plot_option
@_input_options
@_tolerance_options
@_output_options
def verify(original: Path, converted: Path, plot: Path | None, **kw: Any) -> None:
    """Check CONVERTED (made earlier) against ORIGINAL and report its FLOPs."""
    console = _start(kw, plot, (original, converted))
    result = api.verify_pair(
        original, converted, _verify_options(kw), _tolerances(kw), progress=console.progress
    )
    with Staging() as staging:
        _report(
            console,
            kw,
            result.flops,
            result.verification,
            plot,
            {"model": str(original), "converted": str(converted)},
            staging,
        )
        _commit(staging)
    if not result.passed:
        _fail("fidelity check failed: " + "; ".join(result.verification.failures), EXIT_FIDELITY)
    console.echo(click.style("passed", fg="green"))


@main.command()
@click.argument("model", type=_Path())
@_plane_options
@_policy_options
@_input_options
@_output_options
def inspect(model: Path, **kw: Any) -> None:
    """List every Conv of MODEL, whether HASTE would convert it and why, and baseline FLOPs."""
    console = _start(kw, models=(model,))
    result = api.inspect(model, _options(kw), _verify_options(kw))
    flops = {s.name: s.flops for s in result.flops.skipped}
    lines = []
    for d in result.decisions:
        shape = (
            f"{d.in_channels}->{d.out_channels} k{'x'.join(map(str, d.kernel or ()))}"
            if d.kernel
            else "weight unknown"  # computed at run time
        )
        verdict = "convert" if d.converted else f"skip: {d.reason}"
        count = flops.get(d.name)
        lines.append(
            f"{d.name:<32} {shape:<16} {'?' if count is None else f'{count / 1e6:9.2f}M'}"
            f"  {verdict}"
        )
    unknown = result.flops.uncounted
    lines.append(
        f"baseline: {result.flops.baseline_total / 1e6:.2f} MFLOPs per image "
        f"(Conv, Gemm, MatMul{f'; without {len(unknown)} of unknown shape' if unknown else ''}), "
        f"{sum(d.converted for d in result.decisions)} of {len(result.decisions)} convs eligible"
    )
    if unknown and result.unsized:
        lines.append("to count them, give the inputs' dynamic sizes (--dim NAME=SIZE)")
    elif unknown:
        ran_on = "these inputs" if kw.get("inputs") else "zeros"
        lines.append(
            f"their shapes are beyond shape inference, and a run of the model on {ran_on} failed"
        )
    if result.flops.nested:
        lines.append(f"neither converted nor counted: {', '.join(result.flops.nested)}")
    with Staging() as staging:  # the JSON first: what is written does not depend on stdout
        staging.then(lambda: console.echo("\n".join(lines)))
        document = {
            "model": str(model),
            "convs": [vars(d) | {"baseline_flops": flops.get(d.name)} for d in result.decisions],
            "baseline_flops": result.flops.baseline_total,
            "uncounted": result.flops.uncounted,
            "nested": result.flops.nested,
        }
        _write_json(kw["json_path"], document, staging)
        _commit(staging)


DATA_SETS: dict[str, tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]] = {
    "fashion-mnist": ("Fashion-MNIST test set", datasets.load_fashion_mnist),
    "mnist": ("MNIST test set", datasets.load_mnist),
    "cifar10-samples": ("foolbox's 20 CIFAR-10 test images", datasets.load_foolbox_samples),
}


@main.command()
@click.argument("model", type=_Path())
@click.option(
    "--data",
    required=True,
    help=f"Labeled data: {', '.join(DATA_SETS)}, an .npz (images, labels), a folder "
    "of idx files, or a labeled image folder.",
)
@_scale_options
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N images.")
@click.option(
    "--planes",
    "planes",
    callback=_listing(int),
    default="8,12,14,16,20,24",
    show_default=True,
    help="The L values of the sweep, comma-separated.",
)
@click.option(
    "--seeds", type=click.IntRange(1), default=3, show_default=True, help="Seeds per L (0, 1, ...)."
)
@click.option(
    "--stats-images",
    type=click.IntRange(1),
    default=500,
    show_default=True,
    help="Images on which r, m and FLOPs are measured.",
)
@click.option(
    "--ablation-images",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Also run random grouping at LSH's bucket sizes on this many images.",
)
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="onnxruntime intra-op threads."
)
@click.option(
    "--plot",
    type=_NewFile(),
    default=None,
    help="Also draw top-1 accuracy against FLOPs reduction, a point per L, into this PNG "
    "(needs matplotlib).",
)
@_policy_options
@_output_options
def evaluate(
    model: Path,
    data: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    limit: int | None,
    planes: tuple[int, ...],
    seeds: int,
    stats_images: int,
    ablation_images: int,
    threads: int | None,
    plot: Path | None,
    **kw: Any,
) -> None:
    """Top-1 accuracy and FLOPs reduction of MODEL over a sweep of L (paper Table 4)."""
    console = _start(kw, plot, (model,), () if data in DATA_SETS else (Path(data),))
    original = api.load_original(model)
    if data in DATA_SETS:
        title, loader = DATA_SETS[data]
        images, labels = loader()
    else:
        title = str(data)
        images, labels = datasets.load_dataset(data, **evaluation.image_format(original))
    if limit is not None and limit < len(images):
        images, labels = images[:limit], labels[:limit]
        title = f"the first {limit} images of the {title}"
    images = datasets.normalize(images, mean, std)
    result = evaluation.evaluate(
        original,
        images,
        labels,
        f"{model.name} on {title}",
        planes,
        tuple(range(seeds)),
        _options(kw),
        stats_images,
        ablation_images,
        console.progress,
        threads,
    )
    lines = [evaluation.table(result)]
    with Staging() as staging:  # printed once the files are in place, as convert does
        if plot is not None:
            evaluation.plot(result, str(plot), staging)
            lines.append(f"plot: {plot}")
        staging.then(lambda: console.echo("\n".join(lines)))
        _write_json(kw["json_path"], {"model": str(model), **evaluation.to_json(result)}, staging)
        _commit(staging)
