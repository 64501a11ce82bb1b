"""Where Redis is: one redis:// URL, or Redis Sentinel's sentinel:// URLs that lead to the current primary.

The broker (kombu), Celery's result backend and the ledger (redis-py) read the same URL. A
sentinel URL lists the sentinels, `;`-separated, in kombu's format:
`sentinel://:PASSWORD@host1:26379/0;sentinel://host2:26379;sentinel://host3:26379`. The Redis
password and database are the first entry's, because kombu reads only the first entry's; a later
entry may repeat them but not differ. The primary's name and the sentinels' own password (their
`requirepass`) are settings: VITBATCH_SENTINEL_MASTER and VITBATCH_SENTINEL_PASSWORD.

A client built here asks the sentinels for the primary whenever it opens a connection, so after
a failover its next connection goes to the promoted replica; a connection still open to a
primary that was demoted is dropped at its first READONLY reply (redis-py's
SentinelManagedConnection). Lua scripts therefore always run on the current primary.

A primary whose host is cut off closes nothing: its sockets go silent. Every client built from
`connection_options` (the ledger's, kombu's, Celery's backend, Flower's, the exporter's) gives up
on a silent reply after SOCKET_TIMEOUT_S, on unacknowledged bytes after TCP_USER_TIMEOUT_MS and
on an idle peer after a few short keepalive probes, so the reconnect (which asks the sentinels)
reaches the promoted replica seconds after the promotion. A sentinel lookup tries each sentinel
once with a short timeout: redis-py's default (ten retries with backoff, per sentinel) held a
worker minutes on a sentinel that shared the primary's host.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
from kombu.transport.redis import SentinelChannel, SentinelTransport
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from orchestrator.errors import ConfigError

SCHEME = "sentinel"
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 1.0  # a sentinel that does not answer within this is skipped for the next one
CONNECT_TIMEOUT_S = 2.0  # a primary that does not accept within this is gone (or behind a cut link)
SOCKET_TIMEOUT_S = 5.0  # a reply overdue this long drops the connection; the reconnect asks the sentinels
HEALTH_CHECK_INTERVAL_S = 5  # a pooled connection idle this long is PINGed before it is used again
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 5, 2, 3  # an idle dead peer is noticed in ~11 s
TCP_USER_TIMEOUT_MS = 10_000  # bytes unacknowledged this long close the socket (keepalive waits behind them)
RETRIES, RETRY_BASE_S, RETRY_CAP_S = 4, 0.2, 1.0  # each retry reconnects, so asks the sentinels again


def keepalive_options() -> dict[int, int]:
    """TCP options of every Redis socket (Linux names; a platform without one goes without it)."""
    wanted = {"TCP_KEEPIDLE": KEEPALIVE_IDLE_S, "TCP_KEEPINTVL": KEEPALIVE_INTERVAL_S,
              "TCP_KEEPCNT": KEEPALIVE_PROBES, "TCP_USER_TIMEOUT": TCP_USER_TIMEOUT_MS}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def connection_options() -> dict:
    """redis-py's (and kombu's) connection options for every client of the product's Redis."""
    return {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_keepalive": True, "socket_keepalive_options": keepalive_options(),
            "health_check_interval": HEALTH_CHECK_INTERVAL_S, "retry_on_timeout": True}


def client_retry() -> Retry:
    """A command that fails on a dropped or timed-out connection is sent again on a new one."""
    return Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), RETRIES)


@dataclass(frozen=True)
class SentinelEntry:
    """One `sentinel://` entry of a URL: where a sentinel listens, and the Redis credentials it names."""

    host: str
    port: int
    username: str | None
    password: str | None
    db: int | None

    @classmethod
    def parse(cls, text: str) -> SentinelEntry:
        parts = urlsplit(text.strip())
        if parts.scheme != SCHEME or not parts.hostname:
            raise ConfigError(f"{text!r} in a Redis Sentinel URL is not sentinel://[:PASSWORD@]HOST:PORT[/DB]: "
                              "separate the sentinels with ';', each with its own sentinel:// scheme")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"{text!r}: the database after the sentinel's address must be a number")
        return cls(parts.hostname, parts.port or SENTINEL_PORT, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None, int(path) if path else None)


def parse_sentinels(url: str) -> tuple[list[SentinelEntry], dict]:
    """The sentinels of a `sentinel://...;sentinel://...` URL and the Redis connection's credentials and db."""
    entries = [SentinelEntry.parse(chunk) for chunk in url.split(";") if chunk.strip()]
    first = entries[0]
    for entry in entries[1:]:
        for name in ("username", "password", "db"):
            value = getattr(entry, name)
            if value is not None and value != (getattr(first, name) if name != "db" else first.db or 0):
                raise ConfigError(f"the sentinels in VITBATCH_BROKER_URL disagree on the Redis {name}: kombu reads "
                                  "only the first entry's, so give it there (later entries may repeat it or leave it out)")
    params: dict[str, int | str] = {"db": first.db or 0}
    if first.username:
        params["username"] = first.username
    if first.password:
        params["password"] = first.password
    return entries, params


class PrimaryConnection(SentinelManagedConnection):
    """A connection to whichever server the sentinels name as primary, each time it connects.

    redis-py 8.1 reconnects a dropped connection in `send_packed_command` through
    `connect_check_health`, which dials the address the connection last had instead of asking
    the sentinels: after a failover every pooled connection failed once more against the dead
    primary (seen in tests/chaos/test_sentinel.py). Reconnecting through `connect` asks them.
    """

    def send_packed_command(self, command, check_health=True):
        if not self._sock:
            self.connect()
        super().send_packed_command(command, check_health)


class PrimarySentinelChannel(SentinelChannel):
    """kombu's sentinel channel on PrimaryConnection: its consumer, acks and publishes reconnect
    through the sentinels too (with kombu's own class, an ack after a failover dialled the old
    primary's address again and waited out its connect timeout until the consumer gave up)."""

    connection_class = PrimaryConnection

    def _connparams(self, asynchronous: bool = False) -> dict:
        """No redis-py retry under kombu: a connection error reaches kombu, whose consumer reconnects
        through the sentinels. With redis-py's default retry, a subscription read that met the dead
        primary reconnected, subscribed again and then blocked reading a socket on which nothing
        would come: the worker's event loop stood still and took no task after the failover (seen
        in tests/chaos/test_sentinel.py, about one run in four: py-spy showed the worker in
        PubSub.parse_response under Retry.call_with_retry)."""
        return super()._connparams(asynchronous) | {"retry": Retry(NoBackoff(), 0)}


class PrimarySentinelTransport(SentinelTransport):
    """The broker transport for a sentinel:// URL (Celery's `broker_transport`)."""

    Channel = PrimarySentinelChannel


SENTINEL_TRANSPORT = f"{__name__}:PrimarySentinelTransport"


@dataclass(frozen=True)
class RedisEndpoint:
    """A Redis URL plus what a sentinel:// one needs: the primary's name and the sentinels' password."""

    url: str
    master_name: str = "mymaster"
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if self.is_sentinel:
            parse_sentinels(self.url)  # refused here, with the reason, rather than at the first connection

    @property
    def is_sentinel(self) -> bool:
        return self.url.startswith(f"{SCHEME}://")

    def sentinel_kwargs(self) -> dict:
        """How clients talk to the sentinels themselves (not to Redis): one short try each, since a
        lookup moves on to the next sentinel anyway."""
        kwargs = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                  "socket_keepalive": True, "socket_keepalive_options": keepalive_options(),
                  "retry": Retry(NoBackoff(), 0)}
        return kwargs | ({"password": self.sentinel_password} if self.sentinel_password else {})

    def transport_options(self) -> dict:
        """kombu's and Celery's transport options: the connection options, and for a sentinel URL
        the primary's name and how to talk to the sentinels."""
        options = connection_options()
        if not self.is_sentinel:
            return options
        return options | {"master_name": self.master_name, "sentinel_kwargs": self.sentinel_kwargs()}

    @property
    def kombu_transport(self) -> str | None:
        """Celery's `broker_transport` for this URL: None lets the URL's scheme choose."""
        return SENTINEL_TRANSPORT if self.is_sentinel else None

    def client(self, **options) -> redis.Redis:
        """A redis-py client of the primary with `connection_options`; `options` add to them or
        override them (decoding, a probe's shorter timeouts)."""
        options = connection_options() | {"retry": client_retry()} | options
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **options)
        entries, params = parse_sentinels(self.url)
        sentinel = Sentinel([(e.host, e.port) for e in entries], sentinel_kwargs=self.sentinel_kwargs())
        return sentinel.master_for(self.master_name, connection_class=PrimaryConnection, **params, **options)
