"""Forged pickle and YAML messages are refused unrun; no secret leaks into messages, results,
logs, Redis or Flower; a forged manifest line cannot make a worker read outside the job's input."""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from chaos_stack import ROOT, assert_exactly_once, explain, via
from faulty_s3 import FaultyS3

from orchestrator.constants import QUEUE_DEFAULT, TASK_RUN_SHARD
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.results import read_table
from orchestrator.stack.processes import ALL_QUEUES, flower_command, flower_env, free_port
from orchestrator.store.storage import normalize_uri

pytestmark = pytest.mark.chaos
NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class WritesMarker:
    """Unpickling this runs `touch PATH`: the classic pickle exploit, aimed at a harmless file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _envelope(stack) -> dict:
    """A real JSON task message exactly as kombu stores it in Redis, taken off the queue unrun."""
    stack.client.app.send_task(TASK_RUN_SHARD, args=["envelope-probe", 0], queue=QUEUE_DEFAULT)
    return json.loads(stack.client.ledger.r.lpop(QUEUE_DEFAULT))


def _forge(envelope: dict, content_type: str, encoding: str, body: bytes) -> str:
    message = copy.deepcopy(envelope)
    task_id = str(uuid.uuid4())
    message.update({"body": base64.b64encode(body).decode(), "content-type": content_type,
                    "content-encoding": encoding})
    message["headers"].update(id=task_id, root_id=task_id, argsrepr="(forged)")
    message["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
    return json.dumps(message)


def _get(url: str, user: str, password: str) -> str:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def _start_flower(stack, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = flower_command(port)
    secrets_env = flower_env(stack.redis.url(), stack.settings.flower_user, stack.settings.flower_password)
    assert not any(stack.redis.password in part for part in cmd)  # ps shows argv to every local user
    with open(stack.workers.log_dir / "flower.log", "ab") as log:
        proc = subprocess.Popen(cmd, env={**stack.env, **env, **secrets_env}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_http(url: str, user: str, password: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _get(url, user, password)
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def _decoded_bodies(text: str) -> list[str]:
    """The base64 bodies of every kombu message envelope found in `text`, decoded."""
    return [base64.b64decode(body).decode(errors="replace")
            for body in re.findall(r'\\?"body\\?": \\?"([A-Za-z0-9+/=]+)\\?"', text)]


def _redis_dump(r) -> str:
    """Every key and value in Redis, as text."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        value = {"string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1),
                 "set": r.smembers, "zset": lambda k: r.zrange(k, 0, -1)}.get(kind, lambda k: "")(key)
        out.append(f"{key} {value}")
    return "\n".join(out)


def test_pickle_and_yaml_messages_are_refused_and_no_secret_leaks(stack, digits, tmp_path, monkeypatch):
    aws_secret = f"chaos-aws-secret-{secrets.token_hex(8)}"
    planted = {"redis password": stack.redis.password, "aws secret key": aws_secret}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    secret_env = {"AWS_SECRET_ACCESS_KEY": aws_secret}
    r = stack.client.ledger.r

    envelope = _envelope(stack)
    decoy_output = stack.output.rstrip("/") + "-decoy/"
    decoy_id, _ = stack.client.submit(stack.spec(digits.s3_prefix, output=decoy_output))
    r.delete(*ALL_QUEUES.split(","))  # the decoy's own messages: only forged ones will name it

    flower, flower_url = _start_flower(stack, secret_env)
    try:
        stack.workers.start("w", env=secret_env, wait=False)
        _wait_http(f"{flower_url}/api/workers", stack.settings.flower_user, stack.settings.flower_password)
        stack.workers.wait_ready("w")

        marker = tmp_path / "pickle-ran"
        r.lpush(QUEUE_DEFAULT, _forge(envelope, "application/x-python-serialize", "binary",
                                      pickle.dumps(([WritesMarker(marker), 0], {}, NO_EMBED))))
        r.lpush(QUEUE_DEFAULT, _forge(envelope, "application/x-yaml", "utf-8",
                                      yaml.safe_dump([[decoy_id, 0], {}, NO_EMBED]).encode()))
        job_id = stack.submit(digits.s3_prefix)
        status = stack.wait(job_id)
        deadline = time.monotonic() + 60
        while (r.llen(QUEUE_DEFAULT) or stack.workers.log("w").count("Refusing to deserialize") < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.25)
        tasks_json = ""
        while f"{job_id}-00001" not in tasks_json and time.monotonic() < deadline:
            tasks_json = _get(f"{flower_url}/api/tasks", stack.settings.flower_user, stack.settings.flower_password)
            time.sleep(0.25)
        workers_json = _get(f"{flower_url}/api/workers?refresh=1", stack.settings.flower_user,
                            stack.settings.flower_password)  # includes each worker's stats and conf
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            _get(f"{flower_url}/api/tasks", "", "")
    finally:
        flower.kill()
        flower.wait()

    # The forged messages were refused before anything of them ran.
    log = stack.workers.log("w")
    assert "Refusing to deserialize untrusted content of type pickle" in log, log[-3000:]
    assert "Refusing to deserialize untrusted content of type yaml" in log, log[-3000:]
    assert not marker.exists(), "the pickled payload was unpickled"
    assert stack.attempts(decoy_id) == {} and stack.client.ledger.shard_states(decoy_id)[0] is ShardState.PENDING
    assert r.llen(QUEUE_DEFAULT) == 0
    assert stack.workers.procs["w"].poll() is None, "the worker survived the forged messages"
    assert status.state is JobState.SUCCEEDED, explain(status)
    assert anonymous.value.code == 401, "Flower asks for credentials"

    # No planted secret anywhere a message, result or log ends up.
    aof = "".join(p.read_bytes().decode(errors="replace") for p in Path(stack.redis.data_dir).rglob("*.aof"))
    outputs = "".join(stack.store.read(info.uri).decode(errors="replace")
                      for prefix in (stack.output, decoy_output) for info in stack.store.list(prefix))
    places = {
        "task message bodies": "\n".join(_decoded_bodies(aof)),
        "redis append-only file": aof,
        "redis keys and values": _redis_dump(r),
        "job outputs": outputs,
        "worker log": log,
        "flower log": (stack.workers.log_dir / "flower.log").read_text(errors="replace"),
        "flower /api/tasks": tasks_json,
        "flower /api/workers": workers_json,
    }
    assert f"{job_id}-00000" in tasks_json, f"Flower saw the job's tasks: {tasks_json[:1000]}"
    assert '"broker_url"' in workers_json, "Flower showed the workers' configuration"
    assert any(f'[["{job_id}", 0]' in body for body in _decoded_bodies(aof)), "the job's messages were read"
    for place, text in places.items():
        for name, secret in planted.items():
            assert secret not in text, f"the {name} leaked into the {place}"


def _manifest_of(stack, job_id: str, shard: int) -> str:
    """Where the planner wrote the shard's manifest (found by listing: the layout may move)."""
    name = f"_manifests/shard-{shard:05d}.jsonl"
    found = [info.uri for info in stack.store.list(stack.output) if info.uri.endswith(name) and job_id in info.uri]
    if not found:  # an older layout: manifests straight under the output prefix
        found = [info.uri for info in stack.store.list(stack.output) if info.uri.endswith(name)]
    assert len(found) == 1, found
    return found[0]


def test_a_forged_manifest_line_pointing_outside_the_input_is_an_error_row_and_never_read(
        stack, digits, s3, s3_endpoint, tmp_path):
    private = f"vitbatch-private-{secrets.token_hex(3)}"
    s3.create_bucket(Bucket=private)
    secret = next(iter(sorted(digits.keys)))
    image = s3.get_object(Bucket=digits.s3_prefix.split("/")[2], Key=f"digits/{secret}")["Body"].read()
    s3.put_object(Bucket=private, Key="secret.png", Body=image)
    s3.put_object(Bucket=private, Key="secret.tar", Body=b"")
    (tmp_path / "secret.png").write_bytes(image)

    job_id = stack.submit(digits.s3_prefix)  # no worker yet: the manifests wait to be read
    manifest = _manifest_of(stack, job_id, 0)
    lines = [json.loads(line) for line in stack.store.read(manifest).decode().splitlines()]
    forged = {lines[0]["key"]: f"s3://{private}/secret.png",
              lines[1]["key"]: normalize_uri(str(tmp_path / "secret.png")),
              lines[2]["key"]: digits.s3_prefix + "../../" + private + "/secret.png"}
    lines[0]["uri"], lines[1]["uri"], lines[2]["uri"] = forged.values()
    lines[3] = {**lines[3], "uri": f"s3://{private}/secret.tar", "tar": True}
    forged[lines[3]["key"]] = lines[3]["uri"]
    stack.store.write(manifest, ("\n".join(json.dumps(line) for line in lines) + "\n").encode())

    with FaultyS3(s3_endpoint) as proxy:  # counts every object the worker asks S3 for
        stack.workers.start("w", env=via(proxy))
        status = stack.wait(job_id)

    assert status.state is JobState.SUCCEEDED, explain(status)
    rows = {row["key"]: row for row in read_table(stack.output, stack.store).to_pylist()}
    for key in forged:
        assert rows[key]["label"] is None and "outside the job's input" in (rows[key]["error"] or ""), rows[key]
    assert [path for path in proxy.reads if private in path] == [], "an object outside the input was requested"
    assert sum(1 for row in rows.values() if row["error"]) == len(forged)
    assert_exactly_once(stack.output, digits.keys, stack.store)
