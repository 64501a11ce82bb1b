"""The embedded stack as `vitbatch up` runs it: private Redis, Flower with auth."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from orchestrator.config import Settings
from orchestrator.embedded import EmbeddedStack

pytestmark = pytest.mark.integration


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_for_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _get(url)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def test_flower_refuses_requests_without_credentials():
    settings = Settings(flower_user="ops", flower_password="s3cret-flower")
    with EmbeddedStack(workers=0, flower=True, settings=settings) as stack:
        _wait_for_http(stack.flower_url + "/api/workers")
        assert _get(stack.flower_url + "/api/workers") == 401
        assert _get(stack.flower_url + "/api/workers", ("ops", "wrong")) == 401
        assert _get(stack.flower_url + "/api/workers", ("ops", "s3cret-flower")) == 200


def test_embedded_redis_requires_its_password():
    import redis

    with EmbeddedStack(workers=0) as stack:
        url = stack.settings.broker_url
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=stack.redis.port).ping()
