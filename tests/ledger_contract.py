"""The job ledger's contract, one set of tests for every ledger (orchestrator/lifecycle/ledgers.JobLedger).

A test module subclasses `LedgerContract` and gives a `ledger` fixture: the in-memory ledger in the
unit tier (tests/unit/test_memory_ledger.py), the Redis one against a real server in the
integration tier (tests/integration/test_ledger_contract.py). What the lifecycle relies on is here:
deliveries counted, leases that fence earlier ones, progress that only grows, the settled answer,
one publication claim, an ended job that takes no writes and frees its prefix.
"""

from __future__ import annotations

import secrets
import time

import pytest

from orchestrator.errors import JobNotFound, OutputBusy, StaleDelivery
from orchestrator.lifecycle.fencing import Lease
from orchestrator.lifecycle.states import JobState, ShardState


def new_job(ledger, n_shards: int = 2, n_items: int = 4, carried: int = 0) -> tuple[str, str]:
    """A recorded job (as submit leaves it: the prefix held, the job queued); its id and output."""
    job_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)
    output = f"/tmp/ledger-contract/{job_id}"
    ledger.hold_output(output, job_id)
    ledger.create(job_id, '{"kind": "classify"}', "classify", output, n_items=n_items, n_shards=n_shards,
                  carried=carried)
    return job_id, output


class LedgerContract:
    def test_a_recorded_job_is_queued_with_its_spec_and_pending_shards(self, ledger):
        job_id, output = new_job(ledger, n_shards=3, n_items=7, carried=2)
        status = ledger.status(job_id)
        assert ledger.state(job_id) is JobState.QUEUED and ledger.spec_json(job_id) == '{"kind": "classify"}'
        assert (status.output, status.n_items, status.n_shards, status.carried) == (output, 9, 3, 2)
        assert ledger.shard_states(job_id) == dict.fromkeys(range(3), ShardState.PENDING)

    def test_an_unknown_job_is_not_found(self, ledger):
        for read in (ledger.state, ledger.spec_json, ledger.status):
            with pytest.raises(JobNotFound):
                read("20990101-000000-nosuch")

    def test_each_delivery_is_counted_and_fences_off_the_one_before(self, ledger):
        job_id, _ = new_job(ledger)
        first = ledger.start_shard(job_id, 0)
        second = ledger.start_shard(job_id, 0)
        assert (first.attempts, second.attempts) == (1, 2) and second.token > first.token
        assert ledger.state(job_id) is JobState.RUNNING and ledger.shard_states(job_id)[0] is ShardState.RUNNING
        for write in (lambda: ledger.progress(first, 1), lambda: ledger.heartbeat(first),
                      lambda: ledger.hold_for(first, 5), lambda: ledger.record_commit(first, 2, 0, {})):
            with pytest.raises(StaleDelivery):
                write()
        assert not ledger.set_state(job_id, JobState.FAILED, "stale", lease=first)
        assert ledger.record_commit(second, 2, 0, {"compute_s": 0.5}) is False  # shard 1 is pending

    def test_progress_only_grows_and_the_commit_sets_the_counts(self, ledger):
        job_id, _ = new_job(ledger)
        lease = ledger.start_shard(job_id, 0)
        ledger.progress(lease, 3)
        ledger.progress(lease, 1)  # a late report cannot lower it
        assert ledger.status(job_id).done == 3
        ledger.record_commit(lease, 2, 1, {"compute_s": 0.5})
        status = ledger.status(job_id)
        assert (status.done, status.errors, status.shards["committed"]) == (2, 1, 1)
        assert ledger.shard_stats(job_id) == {0: {"compute_s": 0.5}}

    def test_only_the_last_settling_shard_says_the_job_has_settled(self, ledger):
        job_id, _ = new_job(ledger, n_shards=3)
        assert ledger.record_commit(ledger.start_shard(job_id, 2), 1, 0, {}) is False
        assert ledger.fail_shard(ledger.start_shard(job_id, 0), "quarantined") is False
        assert ledger.record_commit(ledger.start_shard(job_id, 1), 1, 0, {}) is True
        assert ledger.status(job_id).failed_shards == {0: "quarantined"}

    def test_a_delivery_that_only_records_a_marker_is_not_counted(self, ledger):
        job_id, _ = new_job(ledger)
        ledger.record_commit(ledger.start_shard(job_id, 0), 1, 0, {})
        again = ledger.start_shard(job_id, 0, count=False)
        assert ledger.shard_states(job_id)[0] is ShardState.COMMITTED
        assert ledger.record_commit(again, 1, 0, {}) is False
        assert ledger.start_shard(job_id, 0).attempts == 2  # the counted delivery before, and this one

    def test_a_stood_down_delivery_leaves_its_shard_pending(self, ledger):
        job_id, _ = new_job(ledger)
        lease = ledger.start_shard(job_id, 0)
        ledger.stand_down(lease)
        assert ledger.shard_states(job_id)[0] is ShardState.PENDING
        with pytest.raises(StaleDelivery):
            ledger.stand_down(Lease(job_id, 0, lease.token - 1))  # an earlier delivery's

    def test_a_hold_puts_the_heartbeat_in_the_future_and_errors_are_kept(self, ledger):
        job_id, _ = new_job(ledger)
        lease = ledger.start_shard(job_id, 0)
        ledger.hold_for(lease, 60)
        assert ledger.heartbeats(job_id)[0] > ledger.now() + 30
        ledger.note_shard_error(job_id, 0, "OSError: gone")
        assert ledger.last_shard_error(job_id, 0) == "OSError: gone" and ledger.last_shard_error(job_id, 1) == ""

    def test_items_found_in_tars_and_a_new_total_count_in_the_status(self, ledger):
        job_id, _ = new_job(ledger, n_items=4)
        ledger.shard_items(job_id, 0, 10)
        assert ledger.status(job_id).n_items == 14
        ledger.set_total(job_id, 100)
        assert ledger.status(job_id).n_items == 110

    def test_one_live_job_holds_a_prefix_until_it_ends(self, ledger):
        job_id, output = new_job(ledger)
        with pytest.raises(OutputBusy, match=job_id):
            ledger.hold_output(output, "second-job")
        ledger.hold_output(output, job_id)  # the holder may take it again
        assert ledger.set_state(job_id, JobState.SUCCEEDED)
        ledger.hold_output(output, "second-job")

    def test_an_ended_job_takes_no_deliveries_writes_or_second_end(self, ledger):
        job_id, _ = new_job(ledger)
        lease = ledger.start_shard(job_id, 0)
        assert ledger.set_state(job_id, JobState.CANCELLED, "cancelled by user")
        with pytest.raises(StaleDelivery) as ended:
            ledger.start_shard(job_id, 1)
        assert ended.value.state == "cancelled"
        with pytest.raises(StaleDelivery):
            ledger.progress(lease, 1)
        assert not ledger.set_state(job_id, JobState.SUCCEEDED)
        status = ledger.status(job_id)
        assert (status.state, status.reason) == (JobState.CANCELLED, "cancelled by user") and status.finished_at > 0

    def test_one_publisher_claims_a_settled_job_and_only_its_claim_ends_it(self, ledger):
        job_id, _ = new_job(ledger, n_shards=1)
        lease = ledger.start_shard(job_id, 0)
        assert ledger.claim_publication(job_id) is None  # unsettled
        ledger.record_commit(lease, 1, 0, {})
        claim = ledger.claim_publication(job_id)
        assert claim is not None and claim.prefix_holder == job_id and claim.finished_at > 0
        assert ledger.claim_publication(job_id) is None  # another publisher is at it
        assert not ledger.set_state(job_id, JobState.CANCELLED)  # nor may anyone else end it meanwhile
        ledger.release_publication(claim)
        second = ledger.claim_publication(job_id)
        assert second is not None and second.finished_at == claim.finished_at  # the same bytes to write
        assert not ledger.set_state(job_id, JobState.SUCCEEDED, publication=claim)  # released: not its to end
        assert ledger.set_state(job_id, JobState.SUCCEEDED, publication=second)
        assert ledger.state(job_id) is JobState.SUCCEEDED and ledger.claim_publication(job_id) is None
