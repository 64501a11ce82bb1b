"""JobStatus.eta_s: what `vitbatch status` and `vitbatch wait` print as the job's ETA."""

from __future__ import annotations

import time

import pytest

from orchestrator.commands.terminal import eta_text
from orchestrator.lifecycle.states import JobState, JobStatus


def status(state: JobState, n_items: int, done: int, elapsed_s: float) -> JobStatus:
    return JobStatus(job_id="j", kind="classify", state=state, output="/o", n_items=n_items, n_shards=1,
                     done=done, errors=0, shards={}, created_at=time.time() - elapsed_s)


def test_the_eta_is_what_is_left_at_the_rate_so_far():
    job = status(JobState.RUNNING, n_items=1000, done=250, elapsed_s=100)  # 2.5 img/s, 750 left
    assert job.eta_s == pytest.approx(300, rel=0.02)
    assert job.to_json()["eta_s"] == pytest.approx(300, rel=0.02)


def test_no_eta_before_the_first_item_and_none_left_once_done_or_ended():
    assert status(JobState.QUEUED, n_items=10, done=0, elapsed_s=5).eta_s is None
    assert status(JobState.RUNNING, n_items=10, done=10, elapsed_s=5).eta_s == 0
    assert status(JobState.CANCELLED, n_items=10, done=3, elapsed_s=5).eta_s == 0


def test_the_eta_prints_as_hours_minutes_seconds():
    assert eta_text(None) == "?"
    assert eta_text(3723.4) == "1:02:03"
    assert eta_text(59.6) == "0:01:00"
