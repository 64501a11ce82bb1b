"""A Redis that takes connections and never answers, as a primary behind a cut link does: the
heartbeat thread may wait on it, the shard it beats for does not."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

from orchestrator.config import Settings
from orchestrator.lifecycle.fencing import Lease
from orchestrator.lifecycle.ledger import Ledger

RELEASE_AFTER_S = 20.0  # the silent server lets go eventually, so the code before the fix ends too


class SilentRedis:
    """A TCP server that reads what it is sent and answers nothing until released."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.asked, self.released = threading.Event(), threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.released.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        try:
            if connection.recv(65536):
                self.asked.set()
                timer = threading.Timer(RELEASE_AFTER_S, self.release)
                timer.daemon = True
                timer.start()
        except OSError:
            pass

    def release(self) -> None:
        self.released.set()
        for sock in [self.server, *self.connections]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_a_shard_leaves_its_heartbeat_behind_when_redis_goes_silent_mid_beat():
    from workers.progress import Heartbeat

    silent = SilentRedis()
    ledger = Ledger.from_url(f"redis://127.0.0.1:{silent.port}/0")
    ctx = SimpleNamespace(settings=Settings(heartbeat_s=0.05), ledger=ledger)
    heartbeat = Heartbeat(ctx, Lease("job", 0, 1))  # type: ignore[arg-type]
    try:
        with heartbeat:
            assert silent.asked.wait(30), "the heartbeat thread sent its beat"
        still_beating = heartbeat._thread.is_alive()
    finally:
        silent.release()
    assert still_beating, "the shard went on while its heartbeat still waited on the silent Redis"
