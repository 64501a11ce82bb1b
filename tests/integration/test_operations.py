"""Operations: worker pools over several "hosts", scheduled incremental runs, model aliases."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from PIL import Image
from support import build_tiny_vit

from orchestrator.errors import ObjectNotFound
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_table
from orchestrator.stack.demo import write_digits
from orchestrator.store.storage import join

pytestmark = pytest.mark.integration


def _markers(client, output: str) -> list[dict]:
    """Every job's commit markers under the prefix (they live in each job's folder)."""
    try:
        infos = list(client.store.list(join(output, "_jobs")))
    except ObjectNotFound:  # no job has written yet
        return []
    return [json.loads(client.store.read(info.uri)) for info in infos if "/_commits/" in info.uri]


def _assert_exactly_once(client, output: str, keys: set[str]) -> list[dict]:
    rows = read_table(output, client.store).to_pylist()
    seen = [r["key"] for r in rows]
    assert len(seen) == len(set(seen)), "duplicate rows"
    assert set(seen) == keys
    assert all(r["label"] is not None or r["error"] for r in rows)
    return rows


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ops-digits")
    write_digits(folder, limit=96)
    return folder


@pytest.fixture(scope="module")
def keys(images) -> set[str]:
    return {p.relative_to(images).as_posix() for p in images.rglob("*.png")}


def test_a_job_split_over_three_hosts_commits_every_item_once(workers, client, images, keys, tiny_model, tmp_path):
    names = ["host-a", "host-b", "host-c"]
    for name in names:
        workers.start(name, wait=False)
    for name in names:
        workers.wait_ready(name)
    spec = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / "out"),
                       "model": str(tiny_model), "shard_size": 8, "batch_size": 4, "lane": "bulk"})
    job_id, _ = client.submit(spec)
    status = client.wait(job_id, timeout_s=300)
    assert status.state.value == "succeeded"
    _assert_exactly_once(client, spec.output, keys)
    hosts = {m["worker"].split("@")[0] for m in _markers(client, spec.output)}
    assert hosts == set(names), f"shards went only to {hosts}"
    for name in names:
        workers.stop(name)


def _wait_until(predicate, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def test_a_worker_added_mid_job_takes_shards(workers, client, images, keys, tiny_model, tmp_path):
    early = workers.start("early")
    spec = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / "out"),
                       "model": str(tiny_model), "shard_size": 4, "batch_size": 2, "lane": "bulk"})
    job_id, _ = client.submit(spec)
    _wait_until(lambda: client.status(job_id).shards["committed"] >= 1)
    os.kill(early.pid, signal.SIGSTOP)  # freeze the first host so the job is still running when the second joins
    try:
        workers.start("late")
        _wait_until(lambda: any(m.get("worker", "").startswith("late@") for m in _markers(client, spec.output)))
    finally:
        os.kill(early.pid, signal.SIGCONT)
    status = client.wait(job_id, timeout_s=300)
    assert status.state.value == "succeeded"
    _assert_exactly_once(client, spec.output, keys)
    hosts = {m["worker"].split("@")[0] for m in _markers(client, spec.output)}
    assert "late" in hosts
    workers.stop("early")
    workers.stop("late")


def _schedule_file(path, images, output, alias) -> str:
    path.write_text(f"""
[[schedule]]
name = "nightly-digits"
cron = "0 2 * * *"
timezone = "Europe/Berlin"
incremental = true
[schedule.job]
kind = "classify"
input = "{images}"
output = "{output}"
model = "alias:{alias}"
shard_size = 64
""")
    return str(path)


def test_nightly_runs_recompute_only_changed_images_until_the_model_changes(
        workers, client, cli, images, keys, tiny_model, tmp_path):
    workers.start("nightly")
    alias = tmp_path / "models" / "latest"
    alias.parent.mkdir(parents=True)
    alias.write_text(str(tiny_model))
    schedules = _schedule_file(tmp_path / "schedules.toml", images, tmp_path / "nightly", alias)

    def run_once() -> dict:
        result = cli(["schedule", "run", "nightly-digits", "--file", schedules])
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)
        assert client.wait(record["job_id"], timeout_s=300).state.value == "succeeded"
        return record

    first = run_once()
    assert first["carried"] == 0 and first["to_compute"] == len(keys)
    time.sleep(1.1)  # file ETags carry mtime in ns; make sure the edit is a new version
    changed = sorted(keys)[:3]
    for key in changed:
        Image.new("RGB", (32, 32), (255, 255, 255)).save(images / key)
    second = run_once()
    assert second["to_compute"] == len(changed)
    assert second["carried"] == len(keys) - len(changed)
    rows = {r["key"]: r for r in _assert_exactly_once(client, second["output"], keys)}
    before = {r["key"]: r for r in read_table(first["output"], client.store).to_pylist()}
    unchanged = keys - set(changed)
    assert all(rows[k]["label_id"] == before[k]["label_id"] for k in unchanged)

    new_model = build_tiny_vit(tmp_path / "models" / "v2", num_labels=10, image_size=32, seed=1)
    alias.write_text(str(new_model))  # what a finetune job with --alias does
    third = run_once()
    assert third["carried"] == 0 and third["to_compute"] == len(keys)
    _assert_exactly_once(client, third["output"], keys)

    listed = cli(["runs", "nightly-digits", "--json"])
    assert listed.returncode == 0, listed.stderr
    history = json.loads(listed.stdout)
    assert [r["run_id"] for r in history] == [third["run_id"], second["run_id"], first["run_id"]]
    assert all(r["state"] == "succeeded" for r in history)
    assert history[1]["summary"]["carried_over"] == len(keys) - len(changed)
    workers.stop("nightly")


def test_an_in_process_classify_output_carries_over_into_a_queued_incremental_run(client, images, keys, tiny_model,
                                                                                  tmp_path):
    from workers.context import WorkerContext
    from workers.inprocess import run_local

    job = {"kind": "classify", "input": str(images), "model": str(tiny_model), "shard_size": 64, "device": "cpu"}
    spec = parse_spec({**job, "output": str(tmp_path / "in-process")})
    run_local(spec, WorkerContext(client.settings))
    nightly = parse_spec({**job, "output": str(tmp_path / "queued")})
    job_id, summary = client.submit(nightly, previous_output=spec.output)  # what a nightly run submits
    assert summary["carried"] == len(keys)  # same images, same model: nothing left to compute
    assert client.wait(job_id, timeout_s=120).state.value == "succeeded"
    rows = {r["key"]: r for r in _assert_exactly_once(client, nightly.output, keys)}
    before = {r["key"]: r for r in read_table(spec.output, client.store).to_pylist()}
    assert {k: r["label_id"] for k, r in rows.items()} == {k: r["label_id"] for k, r in before.items()}


def test_small_jobs_take_the_interactive_lane_ahead_of_bulk(client, images, tiny_model, tmp_path):
    from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE

    small = parse_spec({"kind": "classify", "input": str(images), "output": str(tmp_path / "small"),
                        "model": str(tiny_model), "shard_size": 1000})
    big = small.model_copy(update={"shard_size": 4, "output": str(tmp_path / "big")})
    assert client.queue_for(small, 1) == QUEUE_INTERACTIVE
    assert client.queue_for(big, 60) == QUEUE_DEFAULT
    assert client.queue_for(small.model_copy(update={"lane": "bulk"}), 1) == QUEUE_DEFAULT
