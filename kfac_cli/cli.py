"""The ``kfac-cli`` command line: parse, call one job, report. No maths here.

Heavy imports (torch) happen inside the commands, so ``kfac-cli --help`` stays fast.
Errors the user can fix become one ``Error: …`` line on stderr and exit 1, with the flag
that fixes it where one does; usage errors exit 2; a reader of stdout that goes away (a
broken pipe) ends the command quietly; anything unexpected exits 1 (traceback with
--debug).
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kfac_cli import __version__
from kfac_cli.enums import (
    ComputeDtype,
    FisherType,
    KFACType,
    Layout,
    LossReduction,
    Untreated,
)
from kfac_cli.errors import KfacError, OutputClosed, escape

FORMATS_DOC = "docs/formats.md"
EPILOG = f"File formats: {FORMATS_DOC} in the kfac-cli repository (or its README)."

app = typer.Typer(
    name="kfac-cli",
    help="KFAC curvature preprocessing: convolution patches, the canonical parameter "
    "layout and Kronecker factors, from model checkpoints to safetensors files.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# How each job option that fixes an error is spelled on the command line.
FIXES = {
    "force": "use --force to replace it",
    "spec": "pass --spec FILE (from `kfac-cli layers MODEL.pt2 --json`)",
    "ignore_unknown": "pass --ignore-unknown to skip such keys",
    "separate_bias": "or pass --separate-bias",
    "unsafe_pickle": "or pass --unsafe-trust-pickle if you trust its author completely",
    "dtype": "pass --dtype to convert",
    "columns": "pass --columns",
    "batch_first": "pass --batch-first",
    "grads": "output-gradient dumps go after --grads",
    "inverse": "to convert a canonical file back: kfac-cli canonicalize --inverse CANONICAL",
    "merge": "to combine factors files: kfac-cli merge FACTORS...",
    "dtype_float32": "pass --dtype float32",
    "dtype_float64": "pass --dtype float64",
    "eigenbasis": "pass --eigenbasis FACTORS (made with --eigh) to read it once",
    "exact_damping": "pass --exact-damping",
    "damping": "pass --damping λ > 0",
}
# How each command is called, for an input given in the wrong place ("model_first").
USAGE = {
    "layers": "kfac-cli layers MODEL",
    "patches": "kfac-cli patches MODEL ACTIVATIONS",
    "canonicalize": "kfac-cli canonicalize MODEL TENSORS",
    "factors": "kfac-cli factors MODEL ACTS... --grads GRADS...",
    "merge": "kfac-cli merge FACTORS...",
    "stats": "kfac-cli stats FACTORS",
    "apply": "kfac-cli apply FACTORS TENSORS",
    "export": "kfac-cli export FACTORS --to kronfluence DIR",
}
OPTION_KEYS = {"device": "--device", "dtype": "--dtype"}


def choice(enum: type, allowed: tuple | None = None) -> dict:
    """Option settings for an enumeration: its values as the metavar and a parser whose
    error lists them (``'reduc' is not one of 'expand', 'reduce'``)."""
    members = tuple(allowed or enum)
    names = ", ".join(repr(m.value) for m in members)

    def parse(value: object):
        if isinstance(value, enum) and value in members:
            return value
        for m in members:
            if str(value) == m.value:
                return m
        raise typer.BadParameter(f"{value!r} is not one of {names}")

    return {"parser": parse, "metavar": "<" + "|".join(m.value for m in members) + ">"}


ModelFile = Annotated[Path, typer.Argument(show_default=False, metavar="MODEL")]
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
    ComputeDtype | None,
    typer.Option(
        "--dtype",
        help="Compute and output dtype (default: keep the input's).",
        show_default=False,
        **choice(ComputeDtype),
    ),
]
LayerGlobs = Annotated[
    list[str] | None,
    typer.Option(
        "--layer", help="Only layers matching this glob (repeatable).", show_default=False
    ),
]
Spec = Annotated[
    Path | None,
    typer.Option(
        help="Layer spec JSON (from `kfac-cli layers MODEL.pt2 --json`) giving a "
        "state dict's conv hyper-parameters, names and aliases.",
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
Strict = Annotated[bool, typer.Option("--strict", help="Fail on NaN/Inf inputs (default: warn).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or warnings on stderr.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON summary to stdout.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Eigh = Annotated[
    bool,
    typer.Option(
        "--eigh", help="Also write each factor's eigenvalues and eigenvectors (float64 maths)."
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"kfac-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """KFAC curvature preprocessing from the shell.

    Exit codes: 0 success, 1 bad data or runtime error, 2 usage error. File formats:
    docs/formats.md in the kfac-cli repository.
    """


def error_line(e: KfacError, command: str | None = None) -> str:
    """The ``Error:`` line: option keys as flags, and the flag that fixes it, if any."""
    if e.file is None and e.key in OPTION_KEYS:
        e = KfacError(None, OPTION_KEYS[e.key], e.expected, e.found)
    line = f"Error: {e.line()}"
    if e.fix == "model_first" and command in USAGE:
        line += f"; MODEL comes first: {USAGE[command]}"
    elif e.fix in FIXES:
        line += f" ({FIXES[e.fix]})"
    return line


def _quiet_exit_on_closed_stdout() -> None:
    """The reader of stdout went away: exit as a Unix tool killed by SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    raise typer.Exit(128 + signal.SIGPIPE)


def _run(debug: bool, job: Callable[[], Any], command: str | None = None) -> Any:
    """Run a job; the one place where errors become a stderr line and an exit code."""
    try:
        return job()
    except KfacError as e:
        if debug:
            traceback.print_exc()
        if getattr(e, "quiet", False):  # another rank failed and said why
            raise typer.Exit(1) from None
        err.print(error_line(e, command), markup=False)
        if e.hint:
            err.print(f"Hint: {escape(e.hint)}", markup=False)
        raise typer.Exit(1) from None
    except OutputClosed:
        _quiet_exit_on_closed_stdout()
    except BrokenPipeError:
        _quiet_exit_on_closed_stdout()
    except KeyboardInterrupt:
        err.print("Error: interrupted; no output was written", markup=False)
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        err.print(
            f"Error: internal error ({type(e).__name__}: {escape(e)}); this is a bug in "
            "kfac-cli: please report it with the output of --debug",
            markup=False,
        )
        raise typer.Exit(1) from None


def _reporter(quiet: bool):
    """Progress bar and warnings on stderr (a bar only when stderr is a terminal)."""
    from kfac_cli.jobs.skeleton import Reporter

    if quiet:
        return Reporter(), None
    warn = lambda message: err.print(f"Warning: {escape(message)}", markup=False)  # noqa: E731
    note = lambda message: err.print(f"Note: {escape(message)}", markup=False)  # noqa: E731
    if not err.is_terminal:
        return Reporter(warn=warn, note=note), None
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
        advance=lambda key, n: progress.update(task, advance=n, description=escape(key)),
        warn=warn,
        note=note,
    ), progress


def _with_reporter(quiet: bool, make: Callable[[Any], Any]) -> Callable[[], Any]:
    def job():
        reporter, progress = _reporter(quiet)  # torch is imported now
        if _OWN_PROCESS:
            gc.freeze()
        if progress is None:
            return make(reporter)
        with progress:
            return make(reporter)

    return job


def _check_stdout(out: str, as_json: bool) -> None:
    """``-o -`` shares stdout with nothing, and never writes binary into a terminal (as gzip
    and zstd refuse to; ``--force`` does not change that)."""
    if out == "-" and as_json:
        raise typer.BadParameter("--json cannot share stdout with '-o -'", param_hint="--json")
    if out == "-" and sys.stdout is not None and sys.stdout.isatty():
        raise typer.BadParameter(
            "stdout is a terminal: '-o -' writes binary safetensors data; redirect it "
            "(> FILE or | tool) or give a file",
            param_hint="'-o'",
        )


def _check_model(model: object) -> None:
    if str(model) == "-":
        raise typer.BadParameter(
            "a model checkpoint needs random access: give a file, not '-'", param_hint="MODEL"
        )


def _emit(text: str) -> None:
    """Data on stdout; a closed pipe ends the command quietly."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def _emit_json(summary: dict) -> None:
    _emit(json.dumps(summary) + "\n")


def _run_job(
    command: str, debug: bool, quiet: bool, as_json: bool, make: Callable[[Any], dict]
) -> None:
    summary = _run(debug, _with_reporter(quiet, make), command)
    if as_json:
        _run(debug, lambda: _emit_json(summary), command)


@app.command(epilog=EPILOG)
def layers(
    model: ModelFile,
    spec: Spec = None,
    as_json: JsonOut = False,
    unsafe_trust_pickle: UnsafePickle = False,
    debug: Debug = False,
) -> None:
    """Show the layer table of MODEL: the layers KFAC treats and everything it does not.

    MODEL is a torch.export archive (.pt2, read without unpickling), a state dict
    (.safetensors, sharded *.safetensors.index.json, or .pt/.pth/.bin loaded weights-only)
    or, with --unsafe-trust-pickle, a pickled module. The table lists each Linear and
    Conv1d/2d/3d layer under the name of the module that calls it (the key a forward hook
    records), with its parameters, kernel, stride, padding, dilation, groups, padding mode
    and canonical block size. Underneath: tied weights and their other uses, layers KFAC
    cannot treat (and why), untreated and frozen parameters.

    With --json the table is printed as JSON (the layer spec); that JSON is what --spec
    accepts, to give a state dict its hyper-parameters, names and aliases.

    \b
    Examples:
        $ kfac-cli layers model.pt2
        $ kfac-cli layers model.pt2 --json > spec.json
        $ kfac-cli layers weights.safetensors --spec spec.json
    """
    _check_model(model)

    def job():
        from kfac_cli.models.load import load_layer_table

        table = load_layer_table(model, spec, unsafe_trust_pickle)
        if as_json:
            _emit_json(table.to_json())
        else:
            _print_table(table)

    _run(debug, job, "layers")


def _layer_rows(table) -> list[list[str]]:
    """One row of the layer table per layer: the columns of :data:`TABLE_COLUMNS`."""
    fmt = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    rows = []
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
        rows.append(
            [
                escape(name),
                la.kind,
                fmt(la.weight_shape),
                "yes" if la.bias else "no",
                *hyper,
                str(la.canonical_size),
            ]
        )
    return rows


TABLE_COLUMNS = (
    "layer",
    "kind",
    "weight",
    "bias",
    "kernel",
    "stride",
    "pad",
    "dil",
    "groups",
    "mode",
    "block",
)


def _table_text(rows: list[list[str]], width: int) -> list[str]:
    """The layer table as lines of at most ``width`` columns where it fits; else each layer
    as its name and then ``column value`` pairs folded between pairs, never inside one."""
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(TABLE_COLUMNS)]
    if sum(widths) + 3 * (len(widths) - 1) <= width:

        def line(cells):
            last = len(cells) - 1
            return "   ".join(
                c.rjust(w) if i == last else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        return [line(TABLE_COLUMNS), "-" * len(line(TABLE_COLUMNS)), *map(line, rows)]
    import textwrap

    out = []
    for r in rows:
        out.append(r[0])
        pairs = [f"{c} {v}" for c, v in zip(TABLE_COLUMNS[1:], r[1:])]
        text = "  ".join(p.replace(" ", "\0") for p in pairs)
        for folded in textwrap.wrap(text, max(width - 4, 20), break_long_words=False):
            out.append("    " + folded.replace("\0", " "))
    return out


def _print_table(table) -> None:
    """The layer table on stdout: as wide as the terminal (100 columns when piped), no
    trailing spaces, never a name or value broken inside."""
    import shutil

    width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100
    import textwrap

    title = escape(f"{table.source}: {len(table.layers)} layer(s) treated by KFAC")
    lines = [*textwrap.wrap(title, width, break_long_words=False, break_on_hyphens=False), ""]
    lines += _table_text(_layer_rows(table), width)
    notes = []
    for la in table.layers:
        others = [n for n in la.names if n != la.name]
        if others or la.weight != f"{la.name}.weight" or la.shared_with:
            uses = f"; also used by {', '.join(la.shared_with)}" if la.shared_with else ""
            also = f", also called from {', '.join(others)}" if others else ""
            notes.append(f"  {la.name}: weight {la.weight}{also}{uses}")
    for alias, name in table.aliases.items():
        notes.append(f"  {alias} is {name} (tied)")
    if notes:
        lines += ["Shared and tied weights:", *map(escape, notes)]
    if table.untreated_layers:
        lines.append("Layers KFAC cannot treat:")
        lines += [
            escape(f"  {u['name']} ({u['op']}): {u['reason']}") for u in table.untreated_layers
        ]
    if table.untreated:
        lines.append("Parameters not treated by KFAC:")
        for u in table.untreated:
            used = f"  (used by {', '.join(u['used_by'])})" if u.get("used_by") else ""
            lines.append(escape(f"  {u['name']} {u['shape']}{used}"))
    if table.frozen:
        lines.append(escape(f"Frozen (no gradients): {', '.join(table.frozen)}"))
    _emit("".join(f"{line.rstrip()}\n" for line in lines))


@app.command(epilog=EPILOG)
def patches(
    model: ModelFile,
    activations: Annotated[str, typer.Argument(show_default=False, metavar="ACTIVATIONS")],
    output: Out,
    approx: Annotated[
        KFACType,
        typer.Option(
            help="expand: patches [B, O, (C_in/G)*K]; reduce: averaged patches [B, (C_in/G)*K].",
            **choice(KFACType),
        ),
    ] = KFACType.EXPAND,
    layer: LayerGlobs = None,
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
            help="Skip dump keys that name no layer KFAC treats (with a warning saying why) "
            "instead of failing.",
        ),
    ] = False,
    strict: Strict = False,
    spec: Spec = None,
    unsafe_trust_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Extract the KFAC-expand patches or KFAC-reduce averaged patches of every layer.

    ACTIVATIONS is a safetensors file (or sharded *.index.json set) of layer inputs keyed by
    the layer names that `kfac-cli layers MODEL` shows: [B, C_in, *spatial] for a conv,
    [B, ..., d_in] for a linear layer. '-' (or a named pipe) reads it as a stream, once,
    front to back; the output then follows the dump's tensor order. Each layer in the dump
    gets one tensor in OUT; layers without activations are left out. OUT's metadata records
    the approximation, each layer's hyper-parameters and input shape, and the inputs.

    Layers are streamed in chunks of rows (memory bounded by a chunk); OUT appears
    atomically and only when everything succeeded.

    \b
    Examples:
        $ kfac-cli patches model.pt2 acts.safetensors -o patches.safetensors
        $ kfac-cli patches model.pt2 acts.safetensors -o red.safetensors \\
              --approx reduce --layer 'layer1.*'
        $ zstd -dc acts.safetensors.zst | kfac-cli patches model.pt2 - -o p.safetensors
        $ kfac-cli patches weights.safetensors acts.safetensors --spec spec.json -o - | my-tool
    """
    _check_stdout(output, as_json)
    _check_model(model)

    def make(reporter):
        from kfac_cli.jobs.patches import PatchesOptions, run_patches

        options = PatchesOptions(
            approx=approx,
            patterns=tuple(layer or ()),
            bias_column=bias_column,
            dtype=dtype,
            device=device,
            force=force,
            ignore_unknown=ignore_unknown,
            strict=strict,
            spec=spec,
            unsafe_pickle=unsafe_trust_pickle,
        )
        return run_patches(model, activations, output, options=options, reporter=reporter)

    _run_job("patches", debug, quiet, as_json, make)


@app.command(epilog=EPILOG)
def canonicalize(
    inputs: Annotated[
        list[str],
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
    treated_only: Annotated[
        bool,
        typer.Option(
            "--treated-only",
            help="Leave out every tensor KFAC does not treat (default: keep each as its own "
            "untreated block).",
        ),
    ] = False,
    layer: LayerGlobs = None,
    layout: Annotated[
        Layout,
        typer.Option(help="flat: [C_out*(rest+1)]; matrix: [C_out, rest+1].", **choice(Layout)),
    ] = Layout.FLAT,
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
    force: Force = False,
    spec: Spec = None,
    unsafe_trust_pickle: UnsafePickle = False,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Convert parameter-space tensors to KFAC's canonical layout, and back with --inverse.

    TENSORS (safetensors, sharded set, weights-only .pt, or '-' for a stream) holds tensors
    keyed by parameter name: gradients, parameters, eigenvectors... All of the model's
    parameters or any subset of whole layers (files without frozen parameters, treated
    layers only). OUT holds one tensor per KFAC block, keyed by layer name (joint
    weight+bias) or parameter name (separate); every other tensor (untreated parameters,
    buffers, a tied parameter's second key) is kept as its own block marked untreated,
    unless --treated-only. Its metadata records the blocks, the input's keys, shapes and
    order, and the parameters that were absent, so --inverse gives back exactly the input's
    tensors and needs no model.

    \b
    Examples:
        $ kfac-cli canonicalize model.pt2 grads.safetensors -o canonical.safetensors
        $ kfac-cli canonicalize model.pt2 grads.safetensors -o blocks.safetensors \\
              --layout matrix --batch-first --treated-only
        $ kfac-cli canonicalize --inverse canonical.safetensors -o grads-again.safetensors
        $ cat grads.safetensors | kfac-cli canonicalize model.pt2 - -o -
    """
    _check_stdout(output, as_json)
    if inverse and len(inputs) not in (1, 2):
        raise typer.BadParameter(
            "--inverse takes CANONICAL or MODEL CANONICAL", param_hint="'[MODEL] TENSORS'"
        )
    if not inverse and len(inputs) != 2:
        raise typer.BadParameter("expected MODEL TENSORS", param_hint="'[MODEL] TENSORS'")
    if len(inputs) == 2:
        _check_model(inputs[0])
    if inverse and (
        separate_bias
        or treated_only
        or layer
        or columns
        or batch_first
        or layout is not Layout.FLAT
    ):
        raise typer.BadParameter(
            "with --inverse the layout options come from the file's metadata",
            param_hint="--inverse",
        )

    def make(reporter):
        from kfac_cli.jobs.canonicalize import (
            CanonicalizeOptions,
            run_canonicalize,
            run_uncanonicalize,
        )

        if inverse:  # the layout options come from the file (refused above)
            model = inputs[0] if len(inputs) == 2 else None
            return run_uncanonicalize(
                inputs[-1],
                output,
                model=model,
                dtype=dtype.value if dtype else None,
                force=force,
                spec=spec,
                unsafe_pickle=unsafe_trust_pickle,
                reporter=reporter,
            )
        options = CanonicalizeOptions(
            separate_bias=separate_bias,
            treated_only=treated_only,
            patterns=tuple(layer or ()),
            layout=layout,
            columns=columns,
            batch_first=batch_first,
            dtype=dtype,
            force=force,
            spec=spec,
            unsafe_pickle=unsafe_trust_pickle,
        )
        return run_canonicalize(inputs[0], inputs[1], output, options=options, reporter=reporter)

    _run_job("canonicalize", debug, quiet, as_json, make)


@app.command(epilog=EPILOG)
def factors(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="MODEL ACTS... (activation dumps; '-' reads one from stdin), or with --merge: "
            "FACTORS... (factor files to combine).",
            show_default=False,
            metavar="MODEL ACTS...",
        ),
    ],
    output: Out,
    grads: Annotated[
        list[str] | None,
        typer.Option(
            "--grads",
            help="Output-gradient dumps, one per activation dump and in the same order "
            "(one or more files after one --grads, or --grads before each).",
            show_default=False,
        ),
    ] = None,
    approx: Annotated[
        KFACType,
        typer.Option(
            help="expand: A over every output location; reduce: over averaged patches.",
            **choice(KFACType),
        ),
    ] = KFACType.EXPAND,
    fisher_type: Annotated[
        FisherType | None,
        typer.Option(
            "--fisher-type",
            help="What the gradients are (default: from the gradient files; forward-only "
            "without --grads).",
            show_default=False,
            **choice(FisherType),
        ),
    ] = None,
    loss_reduction: Annotated[
        LossReduction | None,
        typer.Option(
            "--loss-reduction",
            help="How the loss combined its terms (default: from the gradient files).",
            show_default=False,
            **choice(LossReduction),
        ),
    ] = None,
    loss_terms: Annotated[
        int | None,
        typer.Option(
            "--loss-terms",
            min=1,
            help="Loss terms per sample T, e.g. sequence positions (default: from the "
            "gradient files, else 1).",
            show_default=False,
        ),
    ] = None,
    mc_samples: Annotated[
        int | None,
        typer.Option(
            "--mc-samples",
            min=1,
            help="Monte-Carlo samples per datum (default: from the gradient files, else 1).",
            show_default=False,
        ),
    ] = None,
    separate_bias: Annotated[
        bool,
        typer.Option(
            "--separate-bias", help="No ones column in A (weight and bias as separate blocks)."
        ),
    ] = False,
    eigh: Eigh = False,
    ekfac: Annotated[
        bool,
        typer.Option(
            "--ekfac",
            help="Also write EKFAC's eigenvalue corrections, LAYER_BLOCK.corrections: a second "
            "pass over the dumps in the factors' eigenbasis (implies --eigh).",
        ),
    ] = False,
    eigenbasis: Annotated[
        str | None,
        typer.Option(
            "--eigenbasis",
            help="Only the corrections' pass, in the eigenbasis of this factors file (made "
            "with --eigh or --ekfac; same model and conventions); OUT holds the corrections "
            "alone, which merge --eigenbasis completes: for shards and streams (implies "
            "--ekfac).",
            show_default=False,
            metavar="FACTORS",
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option("--merge", help="Combine factor files made from disjoint data."),
    ] = False,
    dtype: Annotated[
        ComputeDtype | None,
        typer.Option(
            "--dtype",
            help="Accumulation and output dtype (default: the dumps' float dtype; float16 and "
            "bfloat16 dumps accumulate in float32).",
            show_default=False,
            **choice(ComputeDtype, (ComputeDtype.FLOAT32, ComputeDtype.FLOAT64)),
        ),
    ] = None,
    device: Device = "cpu",
    layer: LayerGlobs = None,
    ignore_unknown: Annotated[
        bool,
        typer.Option(
            "--ignore-unknown",
            help="Skip dump keys that name no layer KFAC treats (with a warning saying why).",
        ),
    ] = False,
    strict: Strict = False,
    force: Force = False,
    spec: Spec = None,
    unsafe_trust_pickle: UnsafePickle = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Under torchrun: seconds to wait for a rank that stopped responding.", min=1
        ),
    ] = 300.0,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Compute each layer's Kronecker factors A and G from activation and gradient dumps.

    Per layer, over all ACTS together (N samples): A = Σ a aᵀ / (N·O) over the patches
    rows (expand) or Σ ā āᵀ / N over the averaged patches (reduce), with a ones column for
    a joint bias; G = c · Σ g gᵀ over the output gradients of --grads, with curvlinops'
    scale c for the loss reduction (conventions from the gradient files' metadata).
    G ⊗ A is the layer's curvature block, acting as G @ M @ A on the `canonicalize
    --layout matrix` block M. OUT holds LAYER.A and LAYER.G (and with --eigh
    .eigenvalues and .eigenvectors of each); its metadata records N, the conventions and
    each layer's blocks. With --ekfac, a second pass adds each canonical block's EKFAC
    corrections E = c · Σ (Q_Gᵀ ∇ Q_A)² over per-example gradients ∇ (BLOCK.corrections,
    [C_out, D] or [C_out] for a separate bias). Layer by layer, in chunks: memory is a few
    chunks and one layer's factors (and corrections). --merge combines factor files of
    disjoint data into the file one run over all of it gives. Under torchrun each rank
    reads its share and rank 0 writes.

    \b
    Examples:
        $ kfac-cli factors model.pt2 acts-*.safetensors --grads grads-*.safetensors \\
              -o factors.safetensors
        $ kfac-cli factors model.pt2 acts.safetensors -o A.safetensors --approx reduce
        $ kfac-cli factors --merge part-*.safetensors -o factors.safetensors --eigh
        $ kfac-cli factors model.pt2 acts.safetensors --grads grads.safetensors --ekfac \\
              -o ekfac.safetensors
        $ kfac-cli factors model.pt2 acts-3.safetensors --grads grads-3.safetensors \\
              --eigenbasis merged.safetensors -o corrections-3.safetensors
        $ zstd -dc acts.safetensors.zst | kfac-cli factors model.pt2 - -o A.safetensors
        $ torchrun --nproc-per-node 4 -m kfac_cli factors model.pt2 acts-*.safetensors \\
              --grads grads-*.safetensors -o factors.safetensors
    """
    from kfac_cli.jobs.distributed import rank_of_env

    _check_stdout(output, as_json)
    if rank_of_env() != 0:
        quiet, as_json = True, False
    if merge:
        if len(inputs) < 1:
            raise typer.BadParameter("--merge takes one or more factor files", param_hint="FACTORS")
        if grads or layer or fisher_type or loss_reduction or loss_terms or mc_samples:
            raise typer.BadParameter(
                "--merge takes factor files only; their conventions come from their metadata",
                param_hint="--merge",
            )
    else:
        if len(inputs) < 2:
            raise typer.BadParameter("expected MODEL ACTS...", param_hint="'MODEL ACTS...'")
        _check_model(inputs[0])
    if [*inputs, *(grads or [])].count("-") > 1:
        raise typer.BadParameter(
            "at most one input may be '-' (stdin)", param_hint="'MODEL ACTS...'"
        )

    if ekfac and eigenbasis is None and "-" in [*inputs, *(grads or [])]:
        raise typer.BadParameter(
            "EKFAC reads the dumps twice and a stream ('-') once: make the factors with "
            "--eigh first, then pass --eigenbasis FACTORS",
            param_hint="--ekfac",
        )
    if merge and not quiet:
        err.print("Note: `factors --merge` is now `kfac-cli merge FACTORS...`", markup=False)

    def make(reporter):
        from kfac_cli.jobs.factors import FactorsOptions, run_factors
        from kfac_cli.jobs.merge import run_merge

        if merge:
            return run_merge(inputs, output, eigh=eigh, force=force, reporter=reporter)
        options = FactorsOptions(
            approx=approx,
            fisher_type=fisher_type,
            loss_reduction=loss_reduction,
            loss_terms=loss_terms,
            mc_samples=mc_samples,
            separate_bias=separate_bias,
            eigh=eigh,
            ekfac=ekfac,
            eigenbasis=eigenbasis,
            dtype=dtype,
            device=device,
            patterns=tuple(layer or ()),
            ignore_unknown=ignore_unknown,
            strict=strict,
            force=force,
            spec=spec,
            unsafe_pickle=unsafe_trust_pickle,
            timeout=timeout,
        )
        return run_factors(
            inputs[0], inputs[1:], output, grads=grads, options=options, reporter=reporter
        )

    _run_job("factors", debug, quiet, as_json, make)


@app.command(epilog=EPILOG)
def info(
    files: Annotated[list[str], typer.Argument(show_default=False, metavar="FILE...")],
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Show what each FILE is and holds, from its header alone.

    FILE is any safetensors file (a kfac-cli output, a dump, a state dict), a sharded set
    (*.index.json), a stream ('-') or a .pt2 archive. Shown: its kind and format version,
    the metadata decoded (conventions, num_data, the inputs by fingerprint; for factors
    files each layer and its blocks), each tensor's name, dtype, shape and bytes, and
    totals. No tensor data is read and torch is not imported.

    \b
    Examples:
        $ kfac-cli info factors.safetensors
        $ kfac-cli info acts-*.safetensors --json | jq '.files[].metadata.batch_size'
        $ zstd -dc acts.safetensors.zst | kfac-cli info -
    """

    def job():
        from kfac_cli.jobs.info import run_info

        summary = run_info(files)
        _emit_json(summary) if as_json else _emit(_info_text(summary))

    _run(debug, job, "info")


def _info_text(summary: dict) -> str:
    """``kfac-cli info`` for people: per file its kind, metadata and tensors."""
    lines = []
    for f in summary["files"]:
        version = f" (layout version {f['layout_version']})" if f["layout_version"] else ""
        lines.append(
            f"{f['file']}: {f['kind']}{version}, {f['tensor_count']} tensor(s), "
            f"{f['tensor_bytes']} bytes"
        )
        shown = {k: v for k, v in f["metadata"].items() if k != "layers"}
        if shown:
            lines.append("  metadata:")
        for key, value in shown.items():
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            if len(text) > 100 and not isinstance(value, str):
                text = f"({len(value)} entries; see --json)"
            lines.append(f"    {key}: {text}")
        if "layers" in f and isinstance(f["layers"], dict):
            lines.append(f"  layers ({len(f['layers'])}):")
            for name, la in f["layers"].items():
                blocks = ", ".join(str(b.get("key")) for b in la.get("blocks") or [])
                lines.append(
                    f"    {name}: {la.get('kind')}, D {la.get('D')}, C_out {la.get('C_out')}, "
                    f"blocks {blocks}"
                )
        elif "layers" in f:
            lines.append(f"  layers: {', '.join(f['layers'])}")
        lines.append("  tensors:")
        for t in f["tensors"]:
            dtype = t["dtype"] or "-"
            size = "" if t["bytes"] is None else f"  {t['bytes']} bytes"
            lines.append(f"    {t['name']}  {dtype}  {t['shape']}{size}")
    lines.append(f"total: {summary['tensor_count']} tensor(s), {summary['tensor_bytes']} bytes")
    return "".join(escape(line).rstrip() + "\n" for line in lines)


@app.command(epilog=EPILOG)
def apply(
    factors: Annotated[str, typer.Argument(show_default=False, metavar="FACTORS")],
    tensors: Annotated[str, typer.Argument(show_default=False, metavar="TENSORS")],
    output: Out,
    inverse: Annotated[
        bool, typer.Option("--inverse", help="Apply the damped inverse (the power -1).")
    ] = False,
    power: Annotated[
        float | None,
        typer.Option(
            "--power",
            help="Apply this real power (-1 the inverse, -0.5 whitening, 0.5), through the "
            "eigendecompositions.",
            show_default=False,
        ),
    ] = None,
    damping: Annotated[
        str,
        typer.Option(
            "--damping",
            help="λ added to each factor (Tikhonov), or λ_A,λ_G; with --exact-damping to the "
            "curvature.",
            metavar="λ[,λ_G]",
        ),
    ] = "0",
    heuristic_damping: Annotated[
        bool,
        typer.Option(
            "--heuristic-damping",
            help="Split λ between the factors by Martens & Grosse's π: λ_A = max(π√λ, "
            "--min-damping), λ_G = max(√λ/π, --min-damping).",
        ),
    ] = False,
    min_damping: Annotated[
        float, typer.Option("--min-damping", help="The heuristic's floor.", min=0.0)
    ] = 1e-8,
    exact_damping: Annotated[
        bool,
        typer.Option(
            "--exact-damping",
            help="(G ⊗ A + λI)^p in the Kronecker eigenbasis (EKFAC: the only damping).",
        ),
    ] = False,
    untreated: Annotated[
        Untreated,
        typer.Option(
            help="Tensors the factors do not cover: keep, zero, drop or error.",
            **choice(Untreated),
        ),
    ] = Untreated.KEEP,
    columns: Annotated[
        bool,
        typer.Option("--columns", help="Tensors carry a trailing column axis: [*param_shape, C]."),
    ] = False,
    batch_first: Annotated[
        bool,
        typer.Option(
            "--batch-first",
            help="Tensors carry a leading axis of vectors, e.g. per-example gradients: "
            "[N, *param_shape].",
        ),
    ] = False,
    dtype: Annotated[
        ComputeDtype | None,
        typer.Option(
            "--dtype",
            help="Compute dtype (default: float64 for float64 tensors, else float32; each "
            "tensor is written in its own dtype).",
            show_default=False,
            **choice(ComputeDtype, (ComputeDtype.FLOAT32, ComputeDtype.FLOAT64)),
        ),
    ] = None,
    device: Device = "cpu",
    layer: LayerGlobs = None,
    force: Force = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Under torchrun: seconds to wait for a rank that stopped responding.", min=1
        ),
    ] = 300.0,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Apply the curvature of FACTORS, its damped inverse or a power to TENSORS.

    TENSORS holds parameter-space tensors keyed by parameter name (a gradient, a
    parameter update; with --batch-first many vectors, e.g. per-example gradients) or is a
    canonical file. OUT has exactly its keys, shapes, dtypes and order, each block the
    factors cover replaced by (F + damping)^p applied to it: per canonical block in matrix
    layout M, G @ M @ A (EKFAC: Q_G (E ⊙ (Q_Gᵀ M Q_A)) Q_Aᵀ), or with --inverse or --power
    its damped inverse or power, computed once per layer in float64 from the
    eigendecompositions (the file's, else computed). Damping follows curvlinops'
    KFACInverseLinearOperator: --damping λ on each factor (or λ_A,λ_G), --heuristic-damping,
    or --exact-damping. Tensors of other parameters are kept (--untreated). The layer table
    comes from FACTORS: no model needed. Streamed in chunks of the vectors; under torchrun
    the ranks share the chunks and rank 0 writes.

    \b
    Examples:
        $ kfac-cli apply factors.safetensors grad.safetensors --inverse --damping 1e-3 \\
              -o step.safetensors
        $ kfac-cli apply ekfac.safetensors per-example.safetensors --batch-first \\
              --power -1 --exact-damping --damping 1e-4 -o preconditioned.safetensors
        $ kfac-cli apply factors.safetensors samples.safetensors --batch-first --power -0.5 \\
              --exact-damping --damping 1.0 -o - | kfac-cli info -
    """
    from kfac_cli.jobs.distributed import rank_of_env

    _check_stdout(output, as_json)
    if rank_of_env() != 0:
        quiet, as_json = True, False
    if inverse and power is not None and power != -1:
        raise typer.BadParameter("--inverse is --power -1", param_hint="--power")
    try:
        values = tuple(float(v) for v in damping.split(","))
    except ValueError:
        raise typer.BadParameter(f"{damping!r} is no number", param_hint="--damping") from None
    if len(values) > 2:
        raise typer.BadParameter("one value, or two: λ_A,λ_G", param_hint="--damping")

    def make(reporter):
        from kfac_cli.jobs.apply import ApplyOptions, run_apply

        options = ApplyOptions(
            power=-1.0 if inverse else (1.0 if power is None else power),
            damping=values[0] if len(values) == 1 else values,
            heuristic_damping=heuristic_damping,
            min_damping=min_damping,
            exact_damping=exact_damping,
            untreated=untreated,
            batch_first=batch_first,
            columns=columns,
            patterns=tuple(layer or ()),
            dtype=dtype,
            device=device,
            force=force,
            timeout=timeout,
        )
        return run_apply(factors, tensors, output, options=options, reporter=reporter)

    _run_job("apply", debug, quiet, as_json, make)


@app.command(epilog=EPILOG)
def export(
    factors: Annotated[str, typer.Argument(show_default=False, metavar="FACTORS")],
    folder: Annotated[str, typer.Argument(show_default=False, metavar="DIR")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The tool whose files to write: kronfluence (1.0.1).",
            metavar="kronfluence",
        ),
    ] = "kronfluence",
    force: Force = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Write FACTORS as another tool's own files: a kronfluence factors folder.

    DIR becomes kronfluence's factors folder (e.g. OUTPUT/ANALYSIS/factors_NAME, so that
    factors_name=NAME finds it): its covariances with their counts, eigendecompositions,
    for an EKFAC file the Lambda matrices, and factor_arguments.json; its
    compute_pairwise_scores and compute_self_scores then run on it unchanged. What
    kronfluence cannot represent (Conv1d/3d, padding modes, unequal padding, KFAC-reduce,
    separate bias blocks, type-2 Fisher) is refused with one line. Needs the interop extra
    (pip install 'kfac-cli[interop]'). laplace-torch takes a Python object:
    kfac_cli.interop.to_kron_laplace.

    \b
    Examples:
        $ kfac-cli export ekfac.safetensors --to kronfluence influence_results/run/factors_ekfac
    """
    if to != "kronfluence":
        raise typer.BadParameter(f"{to!r} is not one of 'kronfluence'", param_hint="--to")

    def job():
        from kfac_cli.interop import export_kronfluence

        summary = export_kronfluence(factors, folder, force=force)
        if as_json:
            _emit_json(summary)

    _run(debug, job, "export")


@app.command(epilog=EPILOG)
def stats(
    factors: Annotated[str, typer.Argument(show_default=False, metavar="FACTORS")],
    damping: Annotated[
        float,
        typer.Option(help="Exact damping δ: logdet and condition number of F + δI.", min=0.0),
    ] = 0.0,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Show the trace, Frobenius norm, log-determinant and eigenvalue range of FACTORS.

    For each layer (its canonical blocks G ⊗ A, a separate bias's G alone) and in total:
    the dimension, trace and Frobenius norm of the curvature F, log det(F + δI) with exact
    damping (-inf for a singular F without damping), the largest and smallest eigenvalue
    of F and the condition number of F + δI. These are curvlinops' KFACLinearOperator
    trace, frobenius_norm and logdet (an EKFAC file: its corrections are the eigenvalues,
    as EKFACLinearOperator has them), and what a Laplace marginal likelihood and a choice
    of damping need. Eigenvalues come from the file (--eigh) or are computed in float64.

    \b
    Examples:
        $ kfac-cli stats factors.safetensors
        $ kfac-cli stats factors.safetensors --damping 1e-3 --json | jq .total.logdet
    """

    def job():
        from kfac_cli.jobs.stats import run_stats

        summary = run_stats(factors, damping=damping)
        _emit_json(_json_safe(summary)) if as_json else _emit(_stats_text(summary))

    _run(debug, job, "stats")


def _stats_text(summary: dict) -> str:
    """``kfac-cli stats`` for people: a row per layer, then the total."""
    cols = ("dim", "trace", "frobenius_norm", "logdet", "eigenvalue_max", "eigenvalue_min",
            "condition_number")  # fmt: skip
    heads = ("layer", "dim", "trace", "frobenius", "logdet", "λ_max", "λ_min", "condition")
    rows = [[escape(name), *(_num(s[c]) for c in cols)] for name, s in summary["layers"].items()]
    rows.append(["total", *(_num(summary["total"][c]) for c in cols)])
    widths = [max(len(r[i]) for r in [list(heads), *rows]) for i in range(len(heads))]

    def fmt(row) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    kind = "EKFAC, " if summary.get("ekfac") else ""
    damping = f"damping {summary['damping']:g}"
    title = f"{escape(summary['file'])}: {kind}N = {summary['num_data']}, {damping}"
    lines = [title, "", fmt(heads), *map(fmt, rows), *summary["notes"]]
    return "".join(f"{line}\n" for line in lines)


def _json_safe(value):
    """``inf``/``-inf``/``nan`` as the strings ``"inf"``/``"-inf"``/``"nan"`` (JSON has no
    such numbers), everything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


@app.command(epilog=EPILOG)
def merge(
    factor_files: Annotated[list[str], typer.Argument(show_default=False, metavar="FACTORS...")],
    output: Out,
    eigh: Eigh = False,
    eigenbasis: Annotated[
        str | None,
        typer.Option(
            "--eigenbasis",
            help="EKFAC corrections alone (from factors --eigenbasis): the factors file they "
            "were made in, whose factors and eigendecompositions complete the output.",
            show_default=False,
            metavar="FACTORS",
        ),
    ] = None,
    force: Force = False,
    quiet: Quiet = False,
    as_json: JsonOut = False,
    debug: Debug = False,
) -> None:
    """Combine factors files made from disjoint data into the file one run over all of it gives.

    A (and G of a mean loss) are averages over samples: they are combined weighted by each
    file's N; G of a sum loss is a plain sum; counts add up. The files must come from the
    same model, approximation, conventions and dtype, and no input may be given twice.
    EKFAC corrections made in one eigenbasis add up like G; with --eigenbasis the output
    gets that file's factors and eigendecompositions (a complete EKFAC file).

    \b
    Examples:
        $ kfac-cli merge part-*.safetensors -o factors.safetensors
        $ kfac-cli merge part-*.safetensors -o factors.safetensors --eigh --json
        $ kfac-cli merge corrections-*.safetensors --eigenbasis basis.safetensors \\
              -o ekfac.safetensors
    """
    _check_stdout(output, as_json)

    def make(reporter):
        from kfac_cli.jobs.merge import run_merge

        return run_merge(
            factor_files,
            output,
            eigh=eigh,
            eigenbasis=eigenbasis,
            force=force,
            reporter=reporter,
        )

    _run_job("merge", debug, quiet, as_json, make)


MULTI_VALUE_OPTIONS = ("--grads",)


def spread_options(argv: list[str]) -> list[str]:
    """``--grads a b c`` as ``--grads a --grads b --grads c`` (what shell globs give)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        out.append(token)
        i += 1
        if token not in MULTI_VALUE_OPTIONS:
            continue
        values = 0
        while i < len(argv) and (argv[i] == "-" or not argv[i].startswith("-")):
            if values:
                out.append(token)
            out.append(argv[i])
            values += 1
            i += 1
    return out


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _steady_malloc() -> None:
    """Keep glibc from raising its mmap threshold after freeing a large buffer (it then
    serves chunk-sized buffers from a heap it rarely returns to the system): memory
    follows the chunks in hand. Elsewhere, nothing to do."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: the default, fixed
    except OSError:
        pass


# Set by main(): the command runs in a process of its own. There, once torch is imported,
# everything allocated so far is exempt from garbage collection (gc.freeze): collections no
# longer walk torch's hundreds of thousands of long-lived objects again and again (0.1 to
# 0.2 s a command). Not in a host process (tests, notebooks), whose garbage it would keep.
_OWN_PROCESS = False


def main() -> None:
    """Console-script entry point."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    _steady_malloc()
    signal.signal(signal.SIGTERM, _terminate)
    app(args=spread_options(sys.argv[1:]), prog_name="kfac-cli")
