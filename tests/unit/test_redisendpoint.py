"""sentinel:// URLs: what the broker, the result backend and the ledger are each given (no server needed)."""

from __future__ import annotations

import pytest

from orchestrator.config import Settings
from orchestrator.errors import ConfigError
from orchestrator.fleet.celery_app import make_app
from orchestrator.fleet.redisendpoint import PrimaryConnection, RedisEndpoint, parse_sentinels

URL = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def test_a_sentinel_url_lists_every_sentinel_and_takes_the_password_and_db_from_the_first():
    entries, params = parse_sentinels(URL)

    assert [(e.host, e.port) for e in entries] == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)]
    assert params == {"db": 2, "password": "s3cret"}


def test_a_later_sentinel_may_repeat_the_database_but_not_name_another():
    assert parse_sentinels("sentinel://h1:26379;sentinel://h2:26379/0")[1] == {"db": 0}
    with pytest.raises(ConfigError, match="first entry"):
        RedisEndpoint("sentinel://h1:26379;sentinel://h2:26379/3")


def test_every_entry_of_a_sentinel_url_needs_its_own_scheme():
    with pytest.raises(ConfigError, match="sentinel://"):
        RedisEndpoint("sentinel://h1:26379;h2:26379")


def test_the_broker_and_the_backend_get_the_master_name_and_the_sentinels_password():
    app = make_app(Settings(broker_url=URL, sentinel_master="vitbatch", sentinel_password="watch"))

    for options in (app.conf.broker_transport_options, app.conf.result_backend_transport_options):
        assert options["master_name"] == "vitbatch"
        assert options["sentinel_kwargs"]["password"] == "watch"
        assert options["visibility_timeout"] == Settings().visibility_timeout_s
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"


def test_a_plain_redis_url_gets_no_sentinel_options():
    app = make_app(Settings(broker_url="redis://127.0.0.1:6379/0", sentinel_password="watch"))

    assert "master_name" not in app.conf.broker_transport_options
    assert "master_name" not in app.conf.result_backend_transport_options


def test_an_empty_sentinel_password_is_none():
    assert Settings(sentinel_password="").sentinel_password is None


def test_the_ledgers_sentinel_client_asks_for_the_named_primary_on_each_connection():
    client = Settings(sentinel_master="vitbatch").redis_endpoint(URL).client(decode_responses=True)
    pool = client.connection_pool

    assert pool.service_name == "vitbatch" and pool.connection_class is PrimaryConnection
    assert pool.connection_kwargs["password"] == "s3cret" and pool.connection_kwargs["db"] == 2
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [26379, 26380, 26379]
