"""Stop signals (segformer_edge.interrupts): never raised inside an import, never lost to a library that
swallows the exception, and always before a commit. Each case runs in its own interpreter with real signals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "case.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=60)


def test_a_signal_during_an_import_is_raised_after_the_import_finished(tmp_path: Path) -> None:
    (tmp_path / "slow_native.py").write_text(textwrap.dedent("""
        import os, signal, time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the module's initialisation goes on to its end
        COMPLETE = True
    """))
    result = _run(tmp_path, """
        import sys, time
        from segformer_edge import interrupts
        interrupts.install()
        try:
            import slow_native
            time.sleep(5)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted after import, complete:", sys.modules["slow_native"].COMPLETE)
    """)
    assert result.stdout.strip() == "interrupted after import, complete: True", result.stderr


def test_a_swallowed_signal_still_stops_the_commit(tmp_path: Path) -> None:
    result = _run(tmp_path, """
        import os, signal, time
        from pathlib import Path
        from segformer_edge import interrupts
        from segformer_edge.io import atomic_write_text
        interrupts.install()
        Path("artifact.txt").write_text("good")
        try:  # a library's bare except eats the KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:
            pass
        try:
            atomic_write_text("artifact.txt", "half-made")
        except KeyboardInterrupt:
            print("commit refused:", Path("artifact.txt").read_text(), sorted(p.name for p in Path(".").glob(".artifact*")))
    """)
    assert result.stdout.strip() == "commit refused: good []", result.stderr


@pytest.mark.parametrize("swallow", [False, True])
def test_the_cli_exits_130_on_sigterm(tmp_path: Path, swallow: bool) -> None:
    """Through the CLI's own entry point: a signal swallowed by the command still ends in exit code 130."""
    result = _run(tmp_path, f"""
        import os, signal, time, typer
        from segformer_edge.cli import app as cli

        def slow() -> None:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except BaseException:
                if not {swallow}:
                    raise

        def build_app() -> typer.Typer:
            app = typer.Typer()
            app.command()(slow)
            return app

        cli.build_app = build_app
        cli.main([])
    """)
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.strip() == "interrupted: nothing half-written was left behind"


def test_an_in_process_command_gives_the_handlers_back(capsys) -> None:
    """A command run in-process (tests, notebooks) leaves SIGINT and SIGTERM as it found them."""
    import signal

    from conftest import run_cli

    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    code, _, _ = run_cli(["info", "--targets"], capsys)
    assert code == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
