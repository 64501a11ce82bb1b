"""SIGTERM stops the embedded stack's loops even where the KeyboardInterrupt it raises is lost.

Python runs a signal handler between any two bytecodes of the main thread, a finalizer's among
them, and an exception raised in a finalizer is only printed: `vitbatch up` once ran on after
`docker stop` because the interrupt landed in a redis ConnectionPool's `__del__`.
"""

from __future__ import annotations

import os
import signal
import sys

from orchestrator.stack.embedded import EmbeddedStack


class _SigtermWhenFinalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside this finalizer


def test_a_sigterm_whose_interrupt_a_finalizer_swallows_still_ends_serve():
    stack = EmbeddedStack()  # not entered: no processes, so none has died
    ticks, lost = [], []

    def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            _SigtermWhenFinalized()  # dropped at once: its __del__ runs here
        assert len(ticks) < 4, "serve kept ticking after SIGTERM"

    previous_handler, previous_hook = signal.signal(signal.SIGTERM, stack._on_sigterm), sys.unraisablehook
    sys.unraisablehook = lambda unraisable: lost.append(unraisable.exc_type)
    try:
        assert stack.serve(tick, every_s=0.01) == []
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        sys.unraisablehook = previous_hook
    assert lost == [KeyboardInterrupt]  # the interrupt itself was swallowed...
    assert stack.stop_requested.is_set() and ticks == [0]  # ...and serve stopped after that tick all the same
