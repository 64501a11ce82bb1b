"""Schedule files and GPU pools: refused when wrong, at load time rather than at 2 a.m."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from orchestrator.errors import SpecError, VitbatchError
from orchestrator.stack.gpupool import visible_gpus
from orchestrator.submission.schedule import ScheduleEntry, ZonedCrontab, load_schedules, start_run

ENTRY = """
[[schedule]]
name = "{name}"
cron = "{cron}"
timezone = "{tz}"
[schedule.job]
kind = "classify"
input = "s3://b/in/"
output = "s3://b/out/"
model = "{model}"
"""


def _file(tmp_path, *entries: dict) -> str:
    text = "".join(ENTRY.format(**{"name": "nightly", "cron": "0 2 * * *", "tz": "UTC", "model": "hf:org/m", **e})
                   for e in entries)
    (tmp_path / "s.toml").write_text(text)
    return str(tmp_path / "s.toml")


def test_a_valid_file_loads_with_its_timezone(tmp_path):
    (entry,) = load_schedules(_file(tmp_path, {"tz": "Europe/Berlin"}))
    assert entry.crontab().tz == ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize("override, message", [
    ({"cron": "0 2 * *"}, "five fields"),
    ({"cron": "0 25 * * *"}, "cron"),
    ({"tz": "Mars/Olympus"}, "unknown timezone"),
    ({"name": "Nightly Run"}, "lowercase"),
    ({"model": "weird://x"}, "model"),
])
def test_a_bad_entry_is_refused_with_the_reason(tmp_path, override, message):
    with pytest.raises(SpecError, match=message):
        load_schedules(_file(tmp_path, override))


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(SpecError, match="duplicate"):
        load_schedules(_file(tmp_path, {}, {}))


def test_the_cron_expression_is_read_in_the_entrys_timezone():
    berlin = ZonedCrontab("0 2 * * *", "Europe/Berlin")
    # 00:30 UTC on a winter night is 01:30 in Berlin: the 02:00 Berlin run is 30 minutes away.
    last_run = datetime(2026, 11, 25, 2, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    berlin.nowfun = lambda: datetime(2026, 11, 26, 0, 30, tzinfo=UTC)
    assert 29 * 60 <= berlin.remaining_estimate(last_run).total_seconds() <= 31 * 60


class _Recorder:
    """Just what start_run touches of a Client: submit, and the ledger's Redis pipeline."""

    def __init__(self) -> None:
        self.outputs: list[str] = []
        self.ledger, self.r = self, self

    def submit(self, spec, previous_output=None):
        self.outputs.append(spec.output)
        return f"job-{len(self.outputs)}", {"items": 1}

    def pipeline(self, transaction=True):
        return self

    lpush = ltrim = execute = staticmethod(lambda *_: None)  # the run history is not under test here


def test_two_runs_in_the_same_second_get_their_own_output_prefixes():
    entry = ScheduleEntry(name="nightly", cron="0 2 * * *", timezone="Europe/Berlin", incremental=False,
                          job={"kind": "classify", "input": "s3://b/in/", "output": "s3://b/out/", "model": "hf:org/m"})
    client, second = _Recorder(), 1_790_000_000.0
    runs = [start_run(client, entry, now=second + 0.25), start_run(client, entry, now=second + 0.25),
            start_run(client, entry, now=second + 0.75)]
    assert len(set(client.outputs)) == 3 and all(o.startswith("s3://b/out/") for o in client.outputs)
    assert [r["output"] for r in runs] == client.outputs
    assert runs[0]["run_id"] < runs[2]["run_id"] and runs[1]["run_id"] < runs[2]["run_id"]  # sorted by start
    assert runs[0]["run_id"].startswith("20260921T141320.250000Z-")  # the start time in UTC, not Berlin's


def test_gpu_pools_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,3")
    assert visible_gpus("all") == ["0", "1", "3"]
    assert visible_gpus("1,3") == ["1", "3"]
    with pytest.raises(VitbatchError, match="not visible"):
        visible_gpus("2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(VitbatchError, match="no GPUs"):
        visible_gpus("all")
