"""The ``kfac-cli`` command line: parse, call one job, report. No maths here.

Heavy imports (torch) happen inside the commands, so ``kfac-cli --help`` stays fast.
Errors the user can fix become one ``Error: …`` line on stderr and exit 1; usage errors
exit 2; anything unexpected exits 1 with a request to report it (traceback with --debug).
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kfac_cli import __version__
from kfac_cli.errors import KfacCliError

app = typer.Typer(
    name="kfac-cli",
    help="KFAC curvature preprocessing: convolution patches and the canonical parameter "
    "layout, from model checkpoints to safetensors files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ISSUES_URL = "https://github.com/kfac-cli/kfac-cli/issues"


class Approx(str, Enum):
    expand = "expand"
    reduce = "reduce"


class Layout(str, Enum):
    flat = "flat"
    matrix = "matrix"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"
    float16 = "float16"
    bfloat16 = "bfloat16"


InFile = Annotated[Path, typer.Argument(show_default=False)]
Out = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        help="Output safetensors file; '-' writes it to stdout.",
        show_default=False,
    ),
]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output file.")]
Device = Annotated[
    str, typer.Option(help="Compute device: cpu, cuda, cuda:N, mps, or auto (a GPU if present).")
]
DTypeOpt = Annotated[
    DType | None,
    typer.Option(
        "--dtype", help="Compute and output dtype (default: keep the input's).", show_default=False
    ),
]
Spec = Annotated[
    Path | None,
    typer.Option(
        help="Layer spec JSON (from `kfac-cli layers MODEL.pt2 --json`) giving a "
        "state dict's conv hyper-parameters.",
        show_default=False,
    ),
]
UnsafePickle = Annotated[
    bool,
    typer.Option(
        "--unsafe-trust-pickle",
        help="Unpickle a whole pickled module. This RUNS CODE from the file: only for "
        "files you made yourself.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or warnings on stderr.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON summary to stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


def _version(value: bool) -> None:
    if value:
        print(f"kfac-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """KFAC curvature preprocessing from the shell.

    Exit codes: 0 success, 1 bad data or runtime error, 2 usage error.
    """


def _run(debug: bool, job: Callable[[], Any]) -> Any:
    """Run a job; the one place where errors become a stderr line and an exit code."""
    try:
        return job()
    except KfacCliError as e:
        if debug:
            traceback.print_exc()
        err.print(f"Error: {e.line()}", markup=False)
        if e.hint:
            err.print(f"Hint: {e.hint}", markup=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("Error: interrupted; no output was written", markup=False)
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        err.print(
            f"Error: internal error ({type(e).__name__}: {e}); please report it at "
            f"{ISSUES_URL} (rerun with --debug for the traceback)",
            markup=False,
        )
        raise typer.Exit(1) from None


def _reporter(quiet: bool):
    """Progress bar and warnings on stderr (a bar only when stderr is a terminal)."""
    from kfac_cli.jobs import Reporter

    if quiet:
        return Reporter(), None
    warn = lambda message: err.print(f"Warning: {message}", markup=False)  # noqa: E731
    if not err.is_terminal:
        return Reporter(warn=warn), None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task("starting", total=None)
    return Reporter(
        start=lambda total: progress.update(task, total=total),
        advance=lambda key, n: progress.update(task, advance=n, description=key),
        warn=warn,
    ), progress


def _job(quiet: bool, make: Callable[[Any], Callable[[], Any]]) -> Callable[[], Any]:
    def job():
        reporter, progress = _reporter(quiet)
        if progress is None:
            return make(reporter)()
        with progress:
            return make(reporter)()

    return job


def _check_stdout(out: str, as_json: bool) -> None:
    if out == "-" and as_json:
        raise typer.BadParameter("--json cannot share stdout with '-o -'", param_hint="--json")


def _emit_json(summary: dict) -> None:
    sys.stdout.write(json.dumps(summary) + "\n")


@app.command()
def layers(
    model: InFile,
    spec: Spec = None,
    as_json: JsonOut = False,
    unsafe_trust_pickle: UnsafePickle = False,
    debug: Debug = False,
) -> None:
    """Show the layer table of MODEL: the layers KFAC treats and everything it does not.

    MODEL is a torch.export archive (.pt2, read without unpickling), a state dict
    (.safetensors, sharded *.safetensors.index.json, or .pt/.pth/.bin loaded weights-only)
    or, with --unsafe-trust-pickle, a pickled module. The table lists each Linear and
    Conv1d/2d/3d layer with its parameters, kernel, stride, padding, dilation, groups,
    padding mode and canonical block size; parameters KFAC does not treat come underneath.

    With --json the table is printed as JSON (versioned, see README); that JSON is what
    --spec accepts, to give a state dict its conv hyper-parameters.

    \b
    Examples:
        $ kfac-cli layers model.pt2
        $ kfac-cli layers model.pt2 --json > spec.json
        $ kfac-cli layers weights.safetensors --spec spec.json
    """

    def job():
        from kfac_cli.checkpoints import load_layer_table

        table = load_layer_table(model, spec, unsafe_trust_pickle)
        if as_json:
            _emit_json(table.to_json())
        else:
            _print_table(table)

    _run(debug, job)


def _print_table(table) -> None:
    from rich import box
    from rich.table import Table

    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=200)
    t = Table(
        title=f"{table.source}: {len(table.layers)} layer(s) treated by KFAC",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title_justify="left",
    )
    cols = ("layer", "kind", "weight", "bias", "kernel", "stride", "pad", "dil", "groups", "mode")
    for col in cols:
        t.add_column(col, overflow="fold")
    t.add_column("block", justify="right")
    fmt = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    for la in table.layers:
        c = la.conv
        hyper = ["-"] * 6 if not la.is_conv else ["?"] * 6
        if c is not None:
            pad = (
                c.padding
                if isinstance(c.padding, str)
                else fmt(tuple(p if isinstance(p, int) else f"{p[0]}/{p[1]}" for p in c.padding))
            )
            hyper = [
                fmt(c.kernel_size),
                fmt(c.stride),
                pad,
                fmt(c.dilation),
                str(c.groups),
                c.padding_mode,
            ]
        name = la.name if la.calls == 1 else f"{la.name} (x{la.calls})"
        t.add_row(
            name,
            la.kind,
            fmt(la.weight_shape),
            "yes" if la.bias else "no",
            *hyper,
            str(la.canonical_size),
        )
    out.print(t)
    if table.untreated:
        out.print("Not treated by KFAC:")
        for u in table.untreated:
            used = f"  (used by {', '.join(u['used_by'])})" if u.get("used_by") else ""
            out.print(f"  {u['name']} {u['shape']}{used}", markup=False)


@app.command()
def patches(
    model: InFile,
    activations: InFile,
    output: Out,
    approx: Annotated[
        Approx,
        typer.Option(
            help="expand: patches [B, O, (C_in/G)*K]; reduce: averaged patches [B, (C_in/G)*K]."
        ),
    ] = Approx.expand,
    layer: Annotated[
        list[str] | None,
        typer.Option(
            "--layer", help="Only layers matching this glob (repeatable).", show_default=False
        ),
    ] = None,
    bias_column: Annotated[
        bool, typer.Option("--bias-column", help="Append a column of ones (joint weight+bias).")
    ] = False,
    dtype: DTypeOpt = None,
    device: Device = "cpu",
    force: Force = False,
    ignore_unknown: Annotated[
        bool,
        typer.Option(
            "--ignore-unknown",
            help="Skip dump keys that name no layer (with a warning) instead of failing.",
        ),
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on NaN/Inf inputs (default: warn).")
    ] = False,
    spec: Spec = None,
    unsafe_trust_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Extract the KFAC-expand patches or KFAC-reduce averaged patches of every layer.

    ACTIVATIONS is a safetensors file (or sharded *.index.json set) of layer inputs keyed by
    the layer names that `kfac-cli layers MODEL` shows: [B, C_in, *spatial] for a conv,
    [B, ..., d_in] for a linear layer. Each layer in the dump gets one tensor in OUT, with
    the layout of SPEC.md; layers without activations are left out. OUT's metadata records
    the approximation, each layer's hyper-parameters and input shape, and the inputs.

    Layers are streamed one at a time (memory bounded by the largest layer); OUT appears
    atomically and only when everything succeeded.

    \b
    Examples:
        $ kfac-cli patches model.pt2 acts.safetensors -o patches.safetensors
        $ kfac-cli patches model.pt2 acts.safetensors -o red.safetensors \\
              --approx reduce --layer 'layer1.*'
        $ kfac-cli patches weights.safetensors acts.safetensors --spec spec.json -o - | my-tool
    """
    _check_stdout(output, as_json)

    def make(reporter):
        from kfac_cli.patches_job import run_patches

        return lambda: run_patches(
            model,
            activations,
            output,
            approx=approx.value,
            patterns=layer,
            bias_column=bias_column,
            dtype=dtype.value if dtype else None,
            device=device,
            force=force,
            ignore_unknown=ignore_unknown,
            strict=strict,
            spec=spec,
            unsafe_pickle=unsafe_trust_pickle,
            reporter=reporter,
        )

    summary = _run(debug, _job(quiet, make))
    if as_json:
        _emit_json(summary)


@app.command()
def canonicalize(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="MODEL TENSORS, or with --inverse: CANONICAL (or MODEL CANONICAL).",
            show_default=False,
            metavar="[MODEL] TENSORS",
        ),
    ],
    output: Out,
    inverse: Annotated[
        bool,
        typer.Option(
            "--inverse", help="Convert a canonical file back to one tensor per parameter."
        ),
    ] = False,
    separate_bias: Annotated[
        bool,
        typer.Option(
            "--separate-bias", help="Separate weight and bias blocks (default: joint per layer)."
        ),
    ] = False,
    keep_untreated: Annotated[
        bool,
        typer.Option(
            "--keep-untreated", help="Give each parameter KFAC does not treat its own flat block."
        ),
    ] = False,
    layout: Annotated[
        Layout, typer.Option(help="flat: [C_out*(rest+1)]; matrix: [C_out, rest+1].")
    ] = Layout.flat,
    columns: Annotated[
        bool,
        typer.Option("--columns", help="Tensors carry a trailing column axis: [*param_shape, C]."),
    ] = False,
    batch_first: Annotated[
        bool,
        typer.Option(
            "--batch-first", help="Tensors carry a leading batch axis: [N, *param_shape]."
        ),
    ] = False,
    dtype: DTypeOpt = None,
    device: Device = "cpu",
    force: Force = False,
    spec: Spec = None,
    unsafe_trust_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Convert parameter-space tensors to KFAC's canonical layout, and back with --inverse.

    TENSORS (safetensors, sharded set, or weights-only .pt) holds one tensor per parameter
    of MODEL: gradients, parameters, eigenvectors... OUT holds one tensor per KFAC block,
    keyed by layer name (joint weight+bias) or parameter name (separate). Its metadata
    records the groups, names, shapes and order, so --inverse needs no model.

    \b
    Examples:
        $ kfac-cli canonicalize model.pt2 grads.safetensors -o canonical.safetensors
        $ kfac-cli canonicalize model.pt2 grads.safetensors -o blocks.safetensors \\
              --layout matrix --batch-first
        $ kfac-cli canonicalize --inverse canonical.safetensors -o grads-again.safetensors
    """
    _check_stdout(output, as_json)
    if inverse and len(inputs) not in (1, 2):
        raise typer.BadParameter(
            "--inverse takes CANONICAL or MODEL CANONICAL", param_hint="inputs"
        )
    if not inverse and len(inputs) != 2:
        raise typer.BadParameter("expected MODEL TENSORS", param_hint="inputs")
    if inverse and (
        separate_bias or keep_untreated or columns or batch_first or layout is not Layout.flat
    ):
        raise typer.BadParameter(
            "with --inverse the layout options come from the file's metadata",
            param_hint="--inverse",
        )

    def make(reporter):
        from kfac_cli import canonical_job

        common = dict(
            dtype=dtype.value if dtype else None,
            device=device,
            force=force,
            spec=spec,
            unsafe_pickle=unsafe_trust_pickle,
            reporter=reporter,
        )
        if inverse:
            model = inputs[0] if len(inputs) == 2 else None
            return lambda: canonical_job.run_uncanonicalize(
                inputs[-1], output, model=model, **common
            )
        return lambda: canonical_job.run_canonicalize(
            inputs[0],
            inputs[1],
            output,
            separate_bias=separate_bias,
            keep_untreated=keep_untreated,
            layout=layout.value,
            columns=columns,
            batch_first=batch_first,
            **common,
        )

    summary = _run(debug, _job(quiet, make))
    if as_json:
        _emit_json(summary)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    app()
