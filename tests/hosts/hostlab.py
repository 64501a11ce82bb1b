"""A small lab of hosts on one machine: network namespaces joined by a bridge, and the vitbatch
processes on them.

Topology (as root, every name unique to this test session, every address inside the lab):

    <lab>-br   a bridge, one port per host (a veth pair each)
    <lab>-hub  10.77.0.1: S3 (moto), `vitbatch reconcile --loop` and a Redis sentinel
    <lab>-r1   10.77.0.21: the Redis primary (valkey, append-only) and a sentinel
    <lab>-r2   10.77.0.22: its replica and a sentinel (sentinelhosts.py)
    <lab>-wN   10.77.0.1N: one `vitbatch worker` each (solo pool)

Faults are the network's: a host cut off (its link down, or every packet both ways dropped by a
`pfifo limit 0` queue), S3 dropped for one host (a u32 filter into such a queue), and Redis
killed -9 and restarted from its append-only file; a worker's clock set off by libfaketime. The S3 link to every worker host is slow
(an htb rate on the bridge port), so that a shard of a few tiny images lasts seconds.

The test process itself has no address in the lab; `Lab.call` runs a function on a thread
that entered the hub's namespace, so the clients it creates connect from the hub.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.stack.processes import ALL_QUEUES, settings_env

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "vbh-"  # every namespace this harness makes starts so, then the pid of the session that made it
SUBNET, HUB_IP = "10.77.0", "10.77.0.1"
REDIS_PORT, S3_PORT = 6379, 9000
S3_LINK_RATE = "32kbit"  # S3 responses to each worker host: ~0.2 s per tiny PNG, a few seconds per shard
CLONE_NEWNET = 0x40000000
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
JOB_ID = re.compile(r"\b\d{8}-\d{6}-[0-9a-f]{6}\b")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_namespace(ns: str) -> None:
    """Kill what still runs inside (only this harness starts processes there), then delete it."""
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    sh("ip", "netns", "del", ns, check=False)


def sweep_stale_labs() -> None:
    """Namespaces left by a session that was killed before its teardown ran."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"{PREFIX}(\d+)-", name)
        if match and not _alive(int(match.group(1))):
            _remove_namespace(name)


def _enter(ns: str) -> None:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    port: str  # its veth end in the bridge namespace
    cut: str = ""  # "", "link" or "drop"
    s3_dropped: bool = False
    s3_rate: str = S3_LINK_RATE


@dataclass
class Lab:
    """Namespaces, links and the faults on them; `close()` removes every one."""

    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    _hub_thread: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.bridge_ns = f"{self.tag}-br"
        sh("ip", "netns", "add", self.bridge_ns)
        self.ip_in(self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self.ip_in(self.bridge_ns, "link", "set", "br0", "up")

    def ip_in(self, ns: str, *args: str) -> None:
        sh("ip", "-n", ns, *args)

    def tc_in(self, ns: str, *args: str, check: bool = True) -> None:
        sh("ip", "netns", "exec", ns, "tc", *args, check=check)

    def add_host(self, name: str, ip: str) -> Host:
        ns, port = f"{self.tag}-{name}", f"p-{name}"
        sh("ip", "netns", "add", ns)
        self.ip_in(self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip_in(self.bridge_ns, "link", "set", port, "master", "br0", "up")
        self.ip_in(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self.ip_in(ns, "link", "set", "eth0", "up")
        self.ip_in(ns, "link", "set", "lo", "up")
        host = self.hosts[name] = Host(name, ns, ip, port)
        self._shape(host)
        return host

    # -- faults ----------------------------------------------------------------------------
    def cut(self, name: str, how: str = "drop") -> None:
        """Cut the host off: "link" takes its interface down (sends fail at once), "drop" keeps the
        link and drops every packet both ways (connections hang, as behind a dead switch)."""
        host = self.hosts[name]
        host.cut = how
        if how == "link":
            self.ip_in(host.ns, "link", "set", "eth0", "down")
        self._shape(host)

    def heal(self, name: str) -> None:
        host = self.hosts[name]
        if host.cut == "link":
            self.ip_in(host.ns, "link", "set", "eth0", "up")
        host.cut = ""
        self._shape(host)

    def drop_s3(self, name: str, dropped: bool = True) -> None:
        """Drop the host's packets to the S3 server's port only; Redis stays reachable."""
        self.hosts[name].s3_dropped = dropped
        self._shape(self.hosts[name])

    def slow_s3(self, name: str, rate: str = S3_LINK_RATE) -> None:
        """The rate of the host's S3 link (responses from the hub's S3 port)."""
        self.hosts[name].s3_rate = rate
        self._shape(self.hosts[name])

    def _shape(self, host: Host) -> None:
        """Rebuild both ends' queues from the host's state (the kernel here has htb, pfifo and u32)."""
        for ns, dev in ((host.ns, "eth0"), (self.bridge_ns, host.port)):
            self.tc_in(ns, "qdisc", "del", "dev", dev, "root", check=False)
        if host.cut == "drop":
            for ns, dev in ((host.ns, "eth0"), (self.bridge_ns, host.port)):
                self.tc_in(ns, "qdisc", "add", "dev", dev, "root", "pfifo", "limit", "0")
            return
        if host.s3_dropped:
            self._classify(host.ns, "eth0", "dst", S3_PORT, ["pfifo", "limit", "0"])
        if host.name != "hub":
            self._classify(self.bridge_ns, host.port, "src", S3_PORT, None, rate=host.s3_rate)

    def _classify(self, ns: str, dev: str, end: str, port: int, leaf: list[str] | None, rate: str = "10gbit") -> None:
        """htb: packets to (or from) the hub's `port` go to class 1:20 (`rate`, `leaf` queue), the rest pass."""
        self.tc_in(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        self.tc_in(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")
        self.tc_in(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", rate)
        if leaf:
            self.tc_in(ns, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", *leaf)
        self.tc_in(ns, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                   "match", "ip", end, f"{HUB_IP}/32", "match", "ip", f"{end[0]}port", str(port), "0xffff",
                   "flowid", "1:20")

    # -- processes -------------------------------------------------------------------------
    def popen(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.hosts[name].ns, *cmd], env=env, cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def call(self, fn, *args, **kwargs):
        """fn(*args) on a thread inside the hub's namespace: what it connects to, it reaches from the hub."""
        if self._hub_thread is None:
            self._hub_thread = ThreadPoolExecutor(1, initializer=_enter, initargs=(self.hosts["hub"].ns,))
        return self._hub_thread.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        if self._hub_thread is not None:
            self._hub_thread.shutdown(wait=True)
        for host in self.hosts.values():
            _remove_namespace(host.ns)
        _remove_namespace(self.bridge_ns)


def faketime() -> str:
    """The `faketime` command (Debian's faketime package: .ci/test-tools installs it)."""
    path = shutil.which("faketime")
    if path is None:
        raise RuntimeError("a worker with a skewed clock runs under libfaketime: `apt-get install -y faketime` "
                           "(.ci/test-tools installs it when run as root)")
    return path


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@dataclass
class Fleet:
    """The vitbatch processes of one lab: S3 and the reconciler on the hub, workers on hosts (Redis
    and its sentinels: sentinelhosts.py)."""

    lab: Lab
    workdir: Path
    settings: Settings
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = settings_env(self.settings)
        env.update(AWS_ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        return env

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start_s3(self) -> None:
        cmd = [sys.executable, "-m", "moto.server", "-H", HUB_IP, "-p", str(S3_PORT)]
        self.procs["s3"] = self.lab.popen("hub", cmd, {**os.environ, **AWS_ENV}, self.log("s3"))
        self.lab.call(self._until_s3_answers)

    def _until_s3_answers(self, timeout_s: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://{HUB_IP}:{S3_PORT}/", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or self.procs["s3"].poll() is not None:
                    raise RuntimeError(f"S3 did not come up: {self.log('s3').read_text()[-2000:]}") from None
            time.sleep(0.2)

    def start_reconciler(self) -> None:
        self.procs["reconciler"] = self.lab.popen("hub", self.cli_command("reconcile", "--loop"), self.env,
                                                  self.log("reconciler"))

    def start_worker(self, name: str, clock_offset: str = "") -> None:
        """`vitbatch worker` on host `name`, one shard at a time (a CPU host's default); with
        `clock_offset` ("-5m"), its clock is that far off, through libfaketime."""
        cmd = self.cli_command("worker", "--pool", "solo", "--shards-in-flight", "1", "--queues", ALL_QUEUES,
                               "--name", name)
        if clock_offset:
            cmd = [faketime(), "-f", clock_offset, *cmd]
        env = {**self.env, "VITBATCH_MODEL_CACHE_DIR": str(self.workdir / f"models-{name}")}
        self.procs[name] = self.lab.popen(name, cmd, env, self.log(name))

    def stop_worker(self, name: str, timeout_s: float = 60) -> None:
        """Warm shutdown (SIGTERM): the worker finishes its shard and leaves; SIGKILL if it does not."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                stop(proc)

    def wait_ready(self, name: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while " ready." not in self.log(name).read_text(errors="replace"):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start: {self.log(name).read_text()[-3000:]}")
            time.sleep(0.3)

    def cli_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "orchestrator.commands.cli", *args]

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """`vitbatch ARGS` run from the hub, as an operator there runs it."""
        return subprocess.run(["ip", "netns", "exec", self.lab.hosts["hub"].ns, *self.cli_command(*args)],
                              env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)

    def cli_background(self, name: str, *args: str) -> subprocess.Popen:
        return self.lab.popen("hub", self.cli_command(*args), self.env, self.log(name))

    def close(self) -> None:
        for name in list(self.procs):
            stop(self.procs.pop(name))


def submitted_job(out: subprocess.CompletedProcess) -> str:
    match = JOB_ID.search(out.stdout + out.stderr)
    if out.returncode or not match:
        raise AssertionError(f"submit failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    return match.group(0)


# -- which host holds which shard: the unacked messages in Redis, matched to a worker's log -------
def unacked_shards(r) -> dict[str, tuple[str, int]]:
    """Task id -> (job, shard) of every message a worker took and has not acknowledged."""
    held = {}
    for raw in r.hvals("unacked"):
        message = json.loads(raw)[0]
        headers = message.get("headers") or {}
        if headers.get("task") == "vitbatch.run_shard":
            job_id, shard = json.loads(_body(message))[0]
            held[headers["id"]] = (job_id, int(shard))
    return held


def _body(message: dict) -> str:
    import base64

    body = message["body"]
    return base64.b64decode(body).decode() if message.get("properties", {}).get("body_encoding") == "base64" else body


def received_tasks(log_text: str) -> Counter:
    """Task id -> deliveries a worker's log says it received (a retry is received again)."""
    return Counter(re.findall(r"Task vitbatch\.run_shard\[([0-9a-f-]+)\] received", log_text))


def ended_tasks(log_text: str) -> Counter:
    return Counter(re.findall(r"Task vitbatch\.run_shard\[([0-9a-f-]+)\] (?:succeeded|retry|raised|failed)", log_text))


# -- what every scenario ends with ---------------------------------------------------------------
def check_exactly_once(store, output: str, job_id: str, keys: frozenset[str]) -> dict:
    """_SUCCESS.json names `job_id` and lists exactly the parts in its folder, each part is the
    bytes its record and its commit marker name (sha256), and every input key is in them once.
    Returns the record. Run it through `Lab.call`."""
    import hashlib
    import io

    import pyarrow.parquet as pq

    from orchestrator.constants import SUCCESS_FILE, commit_name
    from orchestrator.published.outputs import job_dir
    from orchestrator.store.storage import join

    record = json.loads(store.read(join(output, SUCCESS_FILE)))
    assert record["job_id"] == job_id, f"{SUCCESS_FILE} names job {record['job_id']}, not {job_id}"
    folder = job_dir(output, job_id).rstrip("/")
    listed = {part["name"].rsplit("/", 1)[1]: part for part in record["parts"] if part["name"].endswith(".parquet")}
    in_folder = {info.uri.rsplit("/", 1)[1] for info in store.list(folder + "/")
                 if re.fullmatch(r"part-\d{5}\.parquet", info.uri.rsplit("/", 1)[1])
                 and info.uri.rsplit("/", 1)[0] == folder}
    assert set(listed) == in_folder, f"record lists {sorted(listed)}, the job's folder holds {sorted(in_folder)}"
    counts: Counter = Counter()
    for name, part in listed.items():
        data = store.read(join(output, part["name"]))
        digest = hashlib.sha256(data).hexdigest()
        assert digest == part["sha256"], f"{name} is not the part {SUCCESS_FILE} names"
        marker = json.loads(store.read(join(folder, commit_name(int(name[5:10])))))
        assert marker["job_id"] == job_id and marker["parts"][name]["sha256"] == digest, f"{name}: marker differs"
        counts.update(pq.read_table(io.BytesIO(data)).column("key").to_pylist())
    missing, unexpected = sorted(keys - counts.keys()), sorted(counts.keys() - keys)
    duplicated = {key: n for key, n in counts.items() if n > 1}
    assert not missing, f"{len(missing)} input keys have no output row, e.g. {missing[:5]}"
    assert not unexpected, f"{len(unexpected)} output keys were never input, e.g. {unexpected[:5]}"
    assert not duplicated, f"{len(duplicated)} keys appear more than once, e.g. {list(duplicated.items())[:5]}"
    return record


@dataclass
class World:
    """One lab with its fleet, and what scenarios ask of it; every client call goes through the hub."""

    lab: Lab
    fleet: Fleet
    client: object  # orchestrator.submission.submit.Client, made on the hub's thread
    input_uri: str
    keys: frozenset[str]
    model: Path
    bucket: str
    redis: object  # sentinelhosts.SentinelHosts: the primary, its replica and the sentinels

    def output(self, name: str) -> str:
        return f"s3://{self.bucket}/out/{name}-{secrets.token_hex(3)}/"

    def submit(self, output: str, *options: str) -> str:
        return submitted_job(self.fleet.cli(
            "submit", "classify", "--input", self.input_uri, "--output", output, "--model", str(self.model),
            "--batch-size", "4", "--shard-size", "5", *options))

    def status(self, job_id: str, outage_s: float = 120):
        """The job's status, asked again while Redis restarts."""
        import redis

        deadline = time.monotonic() + outage_s
        while True:
            try:
                return self.lab.call(self.client.status, job_id)
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait_until(self, what: str, condition, timeout_s: float = 120, poll_s: float = 0.3, detail=None):
        """condition()'s first true value; AssertionError naming `what` (and `detail()`) after a
        generous deadline (jobs here take seconds; the deadlines stay under pytest's timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s} s: {what}" + (f" ({detail()})" if detail else ""))
            time.sleep(poll_s)

    def wait_ended(self, job_id: str, timeout_s: float = 150):
        return self.wait_until(f"job {job_id} ends", lambda: (s := self.status(job_id)).state.terminal and s,
                               timeout_s)

    def held_by(self, host: str, job_id: str) -> int | None:
        """A shard of the job that `host`'s worker took and started (the ledger shows it running), if any."""
        log = self.fleet.log(host).read_text(errors="replace")
        return self.lab.call(self._held, set(received_tasks(log) - ended_tasks(log)), job_id)

    def _held(self, tasks: set[str], job_id: str) -> int | None:
        from orchestrator.lifecycle.states import ShardState

        r = self.client.ledger.r
        states = self.client.ledger.shard_states(job_id)
        for task, (job, shard) in unacked_shards(r).items():
            if task in tasks and job == job_id and states.get(shard) is ShardState.RUNNING:
                return shard
        return None

    def idle(self, host: str, job_id: str = "") -> bool:
        """Whether every shard delivery (of `job_id`, or of any job) that `host`'s worker took has
        ended, as its log says (a task's id starts with its job's)."""
        log = self.fleet.log(host).read_text(errors="replace")
        return not [task for task in received_tasks(log) - ended_tasks(log) if task.startswith(job_id)]

    def received(self, host: str) -> int:
        """Shard deliveries `host`'s worker has received so far."""
        return sum(received_tasks(self.fleet.log(host).read_text(errors="replace")).values())

    def shards_committed_by(self, host: str) -> int:
        return len(re.findall(r"run_shard\[[0-9a-f-]+\] succeeded in [\d.]+s: \{'shard': \d+, 'rows'",
                              self.fleet.log(host).read_text(errors="replace")))

    def exactly_once(self, output: str, job_id: str) -> dict:
        return self.lab.call(check_exactly_once, self.client.store, output, job_id, self.keys)
