"""The root of the ``segformer-edge`` CLI.

Each command lives in its own module and imports torch (and anything heavy) inside its body, so that
``segformer-edge --help`` stays fast and needs no torch. Errors caused by the user's input become one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import typer

from segformer_edge import interrupts
from segformer_edge.errors import SegformerEdgeError

from . import bench, calibrate, data, erf, evaluate, export, info, predict, train
from .common import STATE

# Packages outside the targets -> the extra that installs them; the targets' own packages come from the registry.
_EXTRAS = {"torch": "train", "safetensors": "train", "matplotlib": "train", "huggingface_hub": "train"}


def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs, and the converters' output on the terminal."),
) -> None:
    STATE["debug"] = debug
    STATE["verbose"] = verbose or debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    from .common import LineLogHandler, err_console

    logging.basicConfig(level=level, format="%(message)s", handlers=[LineLogHandler(err_console)], force=True)
    if not (debug or verbose):  # third-party import-time chatter (missing CUDA kernels, deprecations) is not the user's concern
        for name in ("torchao", "torch.utils._pytree", "coremltools", "absl", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _target_list() -> str:
    from segformer_edge.converters import target_names

    return ", ".join(target_names())


def build_app() -> typer.Typer:
    """The app, with help texts that list the targets registered now (plugins included)."""
    app = typer.Typer(
        name="segformer-edge",
        help="SegFormer from training to the edge: train, quantize, export to ExecuTorch, LiteRT, Core ML, "
        "ONNX and any registered target, prove parity, measure latency.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    app.command("export", help=export.EXPORT_HELP.format(targets=_target_list()))(export.export)
    app.command("verify", help=export.VERIFY_HELP)(export.verify)
    app.command("calibrate", help=calibrate.HELP)(calibrate.calibrate)
    app.command("bench", help=bench.HELP)(bench.bench)
    app.command("info", help=info.HELP)(info.info)
    app.command("train", help=train.HELP)(train.train)
    app.command("eval", help=evaluate.HELP)(evaluate.evaluate_cmd)
    app.command("predict", help=predict.HELP)(predict.predict)
    app.command("erf", help=erf.HELP)(erf.erf)
    app.add_typer(data.app, name="data")
    return app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map exceptions to exit codes (:data:`_ERRORS`)."""
    STATE["debug"] = "--debug" in (argv if argv is not None else sys.argv[1:])
    # SIGTERM unwinds like Ctrl-C, so that every atomic write removes its temporary file (deferred out of imports).
    previous = interrupts.install()
    try:
        _run(argv)
    finally:
        interrupts.restore(previous)  # an in-process caller (a test, a notebook) gets its own handlers back


def _run(argv: list[str] | None) -> None:
    from .common import err_console

    try:
        # Standalone mode: usage errors (bad options) print Typer's message and exit 2, --help exits 0.
        build_app()(args=argv)
        interrupts.raise_if_interrupted()  # a library swallowed the signal's exception: still not a success
    except BaseException as exc:  # noqa: BLE001 - mapped below; anything unmapped keeps its traceback
        if isinstance(exc, SystemExit) and exc.code in (None, 0, 130) and interrupts.interrupted():
            exc = KeyboardInterrupt("signal")  # Typer maps KeyboardInterrupt to a silent exit 130: say what happened
        elif isinstance(exc, SystemExit) or STATE["debug"] and not isinstance(exc, KeyboardInterrupt):
            raise
        for kind, handle in _ERRORS:
            if isinstance(exc, kind):
                message, code = handle(exc)
                if message is not None:
                    err_console.print(message, markup=False)
                    sys.exit(code)
        raise


def _extra_for(root: str) -> str | None:
    """The pip extra that installs the module ``root``: the table above, or the target that needs it."""
    if root in _EXTRAS:
        return _EXTRAS[root]
    from segformer_edge.converters import get_target, target_names

    for name in target_names():
        target = get_target(name)
        if root in {m.split(".")[0] for m in target.runtime_modules}:
            return target.extra
        if root in {package.replace("-", "_") for package in target.tools}:
            return "export"
    return None


def _missing_module(exc: BaseException) -> tuple[str | None, int]:
    root = (getattr(exc, "name", None) or "").split(".")[0]
    extra = _extra_for(root) if root else None
    if extra is None:
        return None, 0
    return f"error: this command needs {root}, which is not installed; pip install 'segformer-edge[{extra}]'", 2


def _os_error(exc: BaseException) -> tuple[str | None, int]:
    if getattr(exc, "filename", None) is None:
        return None, 0
    return f"error: {exc.filename}: cannot read or write ({exc.strerror}); check the path and its permissions", 2  # type: ignore[attr-defined]


# The one table that maps library errors to what the CLI prints and its exit code (first match wins;
# a handler that returns no message leaves the exception to its traceback).
_ERRORS: list[tuple[type[BaseException], Any]] = [
    (KeyboardInterrupt, lambda exc: ("interrupted: nothing half-written was left behind", 130)),
    (ModuleNotFoundError, _missing_module),
    (SegformerEdgeError, lambda exc: (f"error: {exc}", exc.exit_code)),
    (OSError, _os_error),
]
