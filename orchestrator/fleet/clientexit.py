"""How the `vitbatch` process ends: everything it started is stopped and flushed, then it leaves
with its command's exit code, without the interpreter's teardown.

What is still running when a command has returned (measured on `vitbatch run`: `threading`
lists only the main thread; /proc/self/task lists pyarrow's jemalloc background thread and
four threads of Arrow's CPU and I/O pools, started by reading the first result rows). The
embedded stack's Redis and workers are already reaped, the progress bar's refresh thread joined,
the Celery and Redis connection pools closed. Arrow's pools are native and cannot be stopped
from Python; the interpreter's teardown destroys them with the C++ static objects, and a pool
thread still joinable then ends the process with SIGABRT ("terminate called without an active
exception", about once in 60 runs), after the job had published. So once Python-level work is
done (threads joined, atexit handlers run, objects collected, streams flushed), the process
leaves with `os._exit`: the kernel reclaims the native threads, nothing tears them down.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
from typing import NoReturn

THREAD_JOIN_S = 10.0  # a non-daemon thread the command left running (none known) gets this long


def exit_code(code: object) -> int:
    """SystemExit's code as a process exit status (None: 0; a message: printed, 1), as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def leave(code: int) -> NoReturn:
    """Join what Python started, run the atexit handlers, flush, then end the process with `code`."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(THREAD_JOIN_S)  # what Python's own shutdown would wait for
    atexit._run_exitfuncs()  # the handlers libraries registered (multiprocessing's among them)
    gc.collect()  # Arrow readers and iterators go while Arrow is whole
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said
    os._exit(code)
