"""Every Redis client the product opens gives up on a silent server within seconds (no server needed):
socket timeouts, short TCP keepalive and a user timeout, health checks, and a sentinel lookup that
tries each sentinel once, briefly."""

from __future__ import annotations

import socket

import pytest

from orchestrator.config import Settings
from orchestrator.fleet import redisendpoint as ep
from orchestrator.fleet.celery_app import make_app
from orchestrator.lifecycle.ledger import Ledger

PLAIN = "redis://:pw@10.0.0.9:6379/0"
SENTINELS = "sentinel://:pw@10.0.0.1:26379/0;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379"
URLS = pytest.mark.parametrize("url", [PLAIN, SENTINELS], ids=["redis", "sentinel"])


def assert_bounded(options: dict) -> None:
    """The options of one client: what a cut-off primary needs to be noticed in seconds."""
    assert options["socket_timeout"] == ep.SOCKET_TIMEOUT_S <= 10
    assert options["socket_connect_timeout"] == ep.CONNECT_TIMEOUT_S <= 5
    assert options["socket_keepalive"] is True
    keepalive = options["socket_keepalive_options"]
    assert keepalive[socket.TCP_KEEPIDLE] <= 10 and keepalive[socket.TCP_KEEPINTVL] <= 5
    assert keepalive[socket.TCP_KEEPCNT] <= 5
    assert keepalive[socket.TCP_USER_TIMEOUT] <= 15_000  # data in flight: keepalive alone never fires
    assert options["health_check_interval"] == ep.HEALTH_CHECK_INTERVAL_S <= 10
    assert options["retry_on_timeout"] is True


@URLS
def test_the_ledgers_client_has_timeouts_keepalive_and_health_checks(url):
    ledger = Ledger.from_settings(Settings(broker_url=url))

    kwargs = ledger.r.connection_pool.connection_kwargs
    assert_bounded(kwargs)
    assert kwargs["retry"].get_retries() == ep.RETRIES  # each retry reconnects, asking the sentinels again


@URLS
def test_the_celery_broker_and_backend_transports_have_them(url):
    app = make_app(Settings(broker_url=url))

    assert_bounded(app.conf.broker_transport_options)
    assert_bounded(app.conf.result_backend_transport_options)


@URLS
def test_celerys_redis_backend_builds_its_connections_with_them(url):
    app = make_app(Settings(broker_url=url))

    params = app.backend.connparams
    assert params["socket_timeout"] == ep.SOCKET_TIMEOUT_S
    assert params["socket_connect_timeout"] == ep.CONNECT_TIMEOUT_S
    assert params["socket_keepalive"] is True and params["retry_on_timeout"] is True
    assert params["health_check_interval"] == ep.HEALTH_CHECK_INTERVAL_S


def test_a_sentinel_lookup_tries_each_sentinel_once_with_a_short_timeout():
    client = Settings().redis_endpoint(SENTINELS).client()

    sentinels = client.connection_pool.sentinel_manager.sentinels
    assert len(sentinels) == 3
    for sentinel in sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == ep.SENTINEL_TIMEOUT_S <= 2
        assert kwargs["retry"].get_retries() == 0  # redis-py's default retried one dead sentinel ten times
    assert_bounded(client.connection_pool.connection_kwargs)


def test_kombus_sentinel_transport_gets_the_same_sentinel_options():
    options = make_app(Settings(broker_url=SENTINELS)).conf.broker_transport_options

    assert options["sentinel_kwargs"]["socket_timeout"] == ep.SENTINEL_TIMEOUT_S
    assert options["sentinel_kwargs"]["retry"].get_retries() == 0


@URLS
def test_flower_gets_them_for_any_broker_url(url, monkeypatch):
    from celery import current_app

    from orchestrator.fleet.flowerauth import sentinel_options

    monkeypatch.setenv("CELERY_BROKER_URL", url)
    before = current_app.conf.broker_transport_options
    try:
        sentinel_options(Settings())
        assert_bounded(current_app.conf.broker_transport_options)
    finally:
        current_app.conf.broker_transport_options = before


@URLS
def test_a_clients_ledger_and_app_have_them(url):
    """`submit`, `wait`, `status` and the reconciler are Clients; the exporter serves Ledger.from_settings."""
    from orchestrator.submission.submit import Client

    client = Client.from_settings(Settings(broker_url=url))

    assert_bounded(client.ledger.r.connection_pool.connection_kwargs)
    assert_bounded(client.app.conf.broker_transport_options)
    client.app.close()


def test_a_probe_keeps_its_own_shorter_timeouts():
    client = Settings().redis_endpoint(PLAIN).client(socket_timeout=0.5, socket_connect_timeout=0.5)

    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.5
    assert kwargs["health_check_interval"] == ep.HEALTH_CHECK_INTERVAL_S


def test_kombus_sentinel_connections_reconnect_through_the_sentinels():
    """kombu's own SentinelManagedConnection redialled the old primary's address on an ack after a
    failover; the broker transport of a sentinel URL connects through PrimaryConnection."""
    connection = make_app(Settings(broker_url=SENTINELS)).connection_for_write()

    assert connection.get_transport_cls().Channel.connection_class is ep.PrimaryConnection
    assert make_app(Settings(broker_url=PLAIN)).connection_for_write().get_transport_cls().__name__ == "Transport"
