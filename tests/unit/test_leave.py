"""clientexit.leave: the `vitbatch` process's last step joins threads, runs atexit handlers,
flushes, and exits with the command's code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from orchestrator.fleet.clientexit import exit_code


def test_leave_joins_threads_runs_atexit_handlers_flushes_and_exits_with_the_code(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, pathlib, sys, threading, time
        from orchestrator.fleet.clientexit import leave
        out = pathlib.Path({str(tmp_path)!r})
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        sys.stdout.write("buffered, not yet flushed")
        leave(7)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode == 7, result.stderr
    assert result.stdout == "buffered, not yet flushed"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_exit_code_reads_system_exit_as_python_does(capsys):
    assert exit_code(None) == 0 and exit_code(2) == 2
    assert exit_code("bad config") == 1
    assert capsys.readouterr().err == "bad config\n"
