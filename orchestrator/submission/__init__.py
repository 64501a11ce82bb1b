"""Turning a spec into queued work: submit, the one enqueuer, incremental carry-over and schedules."""
