"""The root of the ``segformer-edge`` CLI.

Each command lives in its own module and imports torch (and anything heavy) inside its body, so that
``segformer-edge --help`` stays fast and needs no torch. Errors caused by the user's input become one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import signal
import sys

import typer

from . import bench, calibrate, data, erf, evaluate, export, info, predict, train

app = typer.Typer(
    name="segformer-edge",
    help="SegFormer from training to the edge: train, quantize, export to ExecuTorch, LiteRT, Core ML "
    "and ONNX, prove parity, measure latency.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
_EXTRAS = {
    "torch": "train", "safetensors": "train", "matplotlib": "train", "executorch": "export",
    "coremltools": "export", "litert_torch": "export", "ai_edge_quantizer": "export", "onnx": "export",
    "onnxscript": "export", "onnxruntime": "runtime", "ai_edge_litert": "runtime",
}  # fmt: skip


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    from rich.logging import RichHandler

    from .common import err_console

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    if not debug:  # third-party import-time chatter (missing CUDA kernels, deprecations) is not the user's concern
        for name in ("torchao", "torch.utils._pytree", "coremltools", "absl", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)


app.command("export", help=export.EXPORT_HELP)(export.export)
app.command("verify", help=export.VERIFY_HELP)(export.verify)
app.command("calibrate", help=calibrate.HELP)(calibrate.calibrate)
app.command("bench", help=bench.HELP)(bench.bench)
app.command("info", help=info.HELP)(info.info)
app.command("train", help=train.HELP)(train.train)
app.command("eval", help=evaluate.HELP)(evaluate.evaluate_cmd)
app.command("predict", help=predict.HELP)(predict.predict)
app.command("erf", help=erf.HELP)(erf.erf)
app.add_typer(data.app, name="data")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map exceptions to exit codes."""
    from segformer_edge.errors import SegformerEdgeError

    from .common import err_console

    _state["debug"] = "--debug" in (argv if argv is not None else sys.argv[1:])
    # SIGTERM unwinds like Ctrl-C, so that every atomic write removes its temporary file.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # Standalone mode: usage errors (bad options) print Typer's message and exit 2, --help exits 0.
        app(args=argv)
    except ModuleNotFoundError as exc:
        if _state["debug"] or exc.name is None:
            raise
        root = exc.name.split(".")[0]
        extra = _EXTRAS.get(root)
        if extra is None:
            raise
        err_console.print(f"error: this command needs {root}, which is not installed; pip install 'segformer-edge[{extra}]'", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing half-written was left behind")
        sys.exit(130)
    except OSError as exc:
        if _state["debug"] or exc.filename is None:
            raise
        err_console.print(f"error: {exc.filename}: cannot read or write ({exc.strerror}); check the path and its permissions", markup=False)
        sys.exit(2)
    except SegformerEdgeError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
