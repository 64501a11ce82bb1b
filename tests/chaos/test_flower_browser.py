"""Flower in a real browser, against `vitbatch up`: headless Chromium (Debian's package, driven
by Playwright) logs in with basic auth and reads the rendered pages, as an operator would.

One job of two shards: shard 0 (150 images) reads slowly through a proxy, so it is seen
running; shard 1's manifest is broken, so every delivery raises and it is quarantined. The
tests read, one page each and in file order, from the rendered DOM: the running shard's row on the first page of the task list
(sorted by Received, newest first) with its state, Received and Started times and its PROGRESS
text (job id, done/total, img/s); its task page; the worker's page; the quarantined shard as
FAILURE with the reason on its task page (and `vitbatch status` giving the same reason); and
/metrics and the pages refused (401) without credentials. Screenshots of each page go to
$VITBATCH_ARTIFACTS/flower-browser/ (default tests/artifacts/, git-ignored).

Without a browser the tests fail and says how to install one; it never passes without looking.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import psutil
import pytest
from chaos_stack import ROOT
from faulty_s3 import FaultyS3

from orchestrator.config import Settings
from orchestrator.constants import manifest_name
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.states import JobState, ShardState
from orchestrator.published.outputs import job_dir
from orchestrator.store.storage import join
from orchestrator.submission.submit import Client

pytestmark = pytest.mark.chaos

USER, PASSWORD = "ops", f"browser-{secrets.token_hex(6)}"
BUCKET = "vitbatch-chaos"  # the chaos conftest's bucket, which holds the digits
DELAY_S = 0.04  # per object read: shard 0's 150 images take 6 s or more, however idle the CPU
ARTIFACTS = Path(os.environ.get("VITBATCH_ARTIFACTS") or ROOT / "tests" / "artifacts") / "flower-browser"
INSTALL = ("install Debian's chromium (as root: DEBIAN_FRONTEND=noninteractive apt-get install -y "
           "--no-install-recommends chromium; ./.ci/test-tools does this when it runs as root) and Playwright "
           "(the dev extra; ./.ci/setup), or point VITBATCH_CHROMIUM at a Chromium binary "
           "(on a machine that can have neither: --deselect tests/chaos/test_flower_browser.py)")


def _chromium() -> str:
    path = os.environ.get("VITBATCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"no Chromium found for the browser check of Flower: {INSTALL}", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(f"Playwright for Python is not installed: {INSTALL}", pytrace=False)
    return path


class GatedS3(FaultyS3):
    """FaultyS3 whose object reads wait until `gate` is set: nothing reads a manifest before the
    test has broken shard 1's (the workers of `vitbatch up` are already waiting for shards)."""

    def __init__(self, upstream: str, **kwargs) -> None:
        super().__init__(upstream, **kwargs)
        self.gate = threading.Event()

    def choose(self, method: str, path: str) -> str | None:
        if method == "GET" and len([s for s in urlsplit(path).path.split("/") if s]) >= 2:
            self.gate.wait(60)
        return super().choose(method, path)


@dataclass
class Up:
    """`vitbatch up` in its own process; its stdout's lines as they come."""

    proc: subprocess.Popen
    env: dict[str, str]
    log: Path
    proxy: GatedS3
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def explain(self) -> str:
        return f"`vitbatch up` printed {self.lines}; its stderr ends: {self.log.read_text()[-2000:]!r}"

    def ready(self, timeout_s: float = 90) -> tuple[str, str]:
        """(Flower's URL, the broker URL), once `up` has printed them and Flower answers."""
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("Ctrl-C stops the stack") for line in self.lines):
            assert self.proc.poll() is None, f"`vitbatch up` exited with {self.proc.returncode}; {self.explain()}"
            assert time.monotonic() < deadline, f"`vitbatch up` not up within {timeout_s} s; {self.explain()}"
            time.sleep(0.1)
        text = "\n".join(self.lines)
        broker = re.search(r"export VITBATCH_BROKER_URL='([^']+)'", text).group(1)
        flower = re.search(rf"Flower: (http://\S+) \(user {USER}, password {re.escape(PASSWORD)}\)", text)
        assert flower, f"`vitbatch up` did not print Flower's address with the configured credentials; {self.explain()}"
        url = flower.group(1)
        auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        while True:
            try:
                request = urllib.request.Request(url + "/api/workers", headers={"Authorization": auth})
                with urllib.request.urlopen(request, timeout=5):
                    return url, broker
            except OSError:
                assert time.monotonic() < deadline, f"Flower did not answer within {timeout_s} s; {self.explain()}"
                time.sleep(0.2)

    def stop(self) -> None:
        self.proxy.gate.set()  # a worker held at the gate could not shut down warmly
        children = psutil.Process(self.proc.pid).children(recursive=True) if self.proc.poll() is None else []
        self.proc.send_signal(signal.SIGINT)  # Ctrl-C: the stack stops its workers, Flower and Redis
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for child in children:  # workers and Flower run in sessions of their own
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def up(s3_endpoint, tmp_path_factory):
    """`vitbatch up --workers 1` as a user starts it, its workers reading S3 through a gated, slow proxy."""
    tmp_path = tmp_path_factory.mktemp("flower-up")
    with GatedS3(s3_endpoint, delay_s=DELAY_S) as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VITBATCH_", "FLOWER_"))}  # as shipped
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path),
                   COLUMNS="1000",  # rich wraps what `up` prints at 80 columns when stdout is a pipe
                   VITBATCH_S3_ENDPOINT_URL=proxy.url, VITBATCH_FLOWER_USER=USER, VITBATCH_FLOWER_PASSWORD=PASSWORD,
                   VITBATCH_MAX_ATTEMPTS="2", VITBATCH_MODEL_CACHE_DIR=str(tmp_path / "model-cache"))
        log = tmp_path / "up.stderr"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator.commands.cli", "up", "--workers", "1",
                                     "--metrics-port", "0"], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        stack = Up(proc, env, log, proxy)
        try:
            yield stack
        finally:
            stack.stop()


# What the rendered task list shows: each row's cells by column (their text), and in `visible` the
# part of each cell's text that is inside the cell's box (Flower cuts long cells with an ellipsis).
ROWS_JS = """() => {
  const columns = [...document.querySelectorAll('#tasks-table thead th')].map(th => th.dataset.column);
  const range = document.createRange();
  function visible(td) {
    const box = td.getBoundingClientRect(), style = getComputedStyle(td);
    let right = box.right - parseFloat(style.paddingRight) - parseFloat(style.borderRightWidth);
    if (td.scrollWidth > td.clientWidth + 1) {  // cut: the ellipsis takes the end of the box
      const pen = document.createElement('canvas').getContext('2d');
      pen.font = style.font;
      right -= pen.measureText('\u2026').width;
    }
    let out = '';
    const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
    for (let node; (node = walker.nextNode());) {
      for (let i = 0; i < node.length; i++) {
        range.setStart(node, i); range.setEnd(node, i + 1);
        const r = range.getBoundingClientRect();
        if (r.width || r.height) { out += r.right <= right + 0.5 ? node.data[i] : ''; }  // hidden: no box
      }
    }
    return out.replace(/\\s+/g, ' ').trim();
  }
  return [...document.querySelectorAll('#tasks-table tbody tr[id]')].map(tr => {
    const row = {id: tr.id, visible: {}};
    [...tr.querySelectorAll('td')].forEach((td, i) => {
      const full = td.querySelector('.task-uuid-full');  // the uuid cell also holds a short form for phones
      row[columns[i]] = (full || td).textContent.replace(/\\s+/g, ' ').trim();
      row.visible[columns[i]] = visible(td);
    });
    return row;
  });
}"""
# A detail page's rows (task or worker page): label -> shown text.
DETAILS_JS = """() => Object.fromEntries([...document.querySelectorAll('.detail-list .detail-row')].map(
  row => [row.querySelector('dt').innerText.trim(), row.querySelector('dd').innerText.trim()]))"""
COLUMNS_JS = "() => [...document.querySelectorAll('#tasks-table thead th')].map(th => th.dataset.column)"
# The dashboard's workers table: each row's cells, keyed by the header's labels.
WORKERS_JS = """() => {
  const labels = [...document.querySelectorAll('#workers-table thead th')].map(th => th.textContent.trim());
  return [...document.querySelectorAll('#workers-table tbody tr')].map(tr => Object.fromEntries(
    [...tr.querySelectorAll('td')].map((td, i) => [labels[i] || i, td.textContent.replace(/\\s+/g, ' ').trim()])));
}"""
# Fetch each path without credentials from the current page; show and return (path, status, body).
FETCH_JS = """async (paths) => {
  const out = [];
  for (const path of paths) {
    const response = await fetch(path, {credentials: 'omit'});
    out.push([path, response.status, (await response.text()).slice(0, 120)]);
  }
  document.body.innerText = out.map(([path, status, body]) =>
    `GET ${path} without credentials: HTTP ${status}: ${body}`).join('\\n');
  return out;
}"""
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def _task_rows(page, url: str, wanted: str) -> list[dict]:
    """The first page of Flower's task list, freshly loaded, once the row `wanted` is drawn (or after 3 s)."""
    from playwright.sync_api import TimeoutError as Timeout

    page.goto(url + "/tasks")
    try:
        page.wait_for_selector(f'#tasks-table tbody tr[id="{wanted}"]', timeout=3000)
    except Timeout:  # not there (yet): the caller polls again
        pass
    return page.evaluate(ROWS_JS)


def _status_without_credentials(page, url: str) -> int | None:
    """The HTTP status the browser got for `url`; a 401 without credentials to offer ends the
    navigation in Chromium's ERR_INVALID_AUTH_CREDENTIALS, so it is read from the response event."""
    from playwright.sync_api import Error

    statuses = []

    def seen(response) -> None:
        if response.url == url:
            statuses.append(response.status)

    page.on("response", seen)
    try:
        return page.goto(url).status
    except Error as e:
        assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e), e
        return statuses[-1] if statuses else None
    finally:
        page.remove_listener("response", seen)


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@dataclass
class Scene:
    """One job seen through one browser, page by page: the tests below read it in file order
    (shard 0 running, then the job's end), each test one page."""

    browser: object
    page: object
    flower: str
    broker: str
    client: Client
    job_id: str
    t0: float
    worker: str = ""
    reason: str = ""

    @property
    def running_id(self) -> str:
        return f"{self.job_id}-00000"

    @property
    def failed_id(self) -> str:
        return f"{self.job_id}-00001"

    def running(self) -> bool:
        return self.client.ledger.shard_states(self.job_id).get(0) is ShardState.RUNNING

    def progress(self, text: str) -> int | None:
        """Images done, if `text` is shard 0's progress: its job, done/total and images/s."""
        done = re.search(r"\b(\d+)/150 images\b", text)
        says_all = self.job_id in text and "shard 0" in text and re.search(r"\b\d+ img/s\b", text)
        return int(done.group(1)) if done and says_all else None


@pytest.fixture(scope="module")
def scene(up, digits, tiny_model, s3_endpoint):
    """Chromium logged in to Flower, and the job of two shards submitted with shard 1's manifest broken."""
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    t0 = time.monotonic()
    with sync_playwright() as pw:
        try:  # while `vitbatch up` starts
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        except Exception as e:
            pytest.fail(f"{chromium} did not start under Playwright ({e}); {INSTALL}", pytrace=False)
        print(f"browser check of Flower: {chromium} {browser.version}; screenshots in {ARTIFACTS}")
        flower, broker = up.ready()
        settings = Settings(broker_url=broker, result_backend=None, s3_endpoint_url=s3_endpoint)
        client = Client.from_settings(settings)
        try:
            spec = parse_spec({"kind": "classify", "input": digits.s3_prefix, "model": str(tiny_model),
                               "output": f"s3://{BUCKET}/out/flower-browser-{secrets.token_hex(3)}/",
                               "batch_size": 4, "shard_size": 150, "read_concurrency": 1})
            job_id, _ = client.submit(spec)  # 150 + 10 images
            client.store.write(join(job_dir(spec.output, job_id), manifest_name(1)),
                               b'{"key": "0/digit-0000.png", "uri": \n')  # every delivery of shard 1 raises
            up.proxy.gate.set()
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1920, "height": 1000})
            yield Scene(browser, context.new_page(), flower, broker, client, job_id, t0)
        finally:
            client.app.close()
            browser.close()
    print(f"browser check of Flower took {time.monotonic() - t0:.1f} s; screenshots in {ARTIFACTS}")


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request, scene):
    """What the browser showed when a test failed: failed-<test>.png (the report comes from tests/chaos/conftest.py)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        try:
            scene.page.screenshot(path=str(ARTIFACTS / f"failed-{request.node.name}.png"), full_page=True)
        except Exception:  # the browser is gone: the failure itself says why
            pass


def test_task_list_shows_the_running_shard_with_its_progress(scene):
    page, problems = scene.page, []  # problems: what Flower shows untruly or not at all, reported together
    seen, deadline, columns = [], time.monotonic() + 90, None
    while True:
        rows = _task_rows(page, scene.flower, scene.running_id)
        still_running = scene.running()
        columns = columns or page.evaluate(COLUMNS_JS)
        row = next((r for r in rows if r["id"] == scene.running_id), {})
        seen.append((still_running, row.get("state"), row.get("result")))
        if (still_running and row.get("state") in ("PROGRESS", "STARTED") and re.match(TIME, row["received"])
                and ("result" not in columns or scene.progress(row["result"]))
                and ("started" not in columns or re.match(TIME, row["started"]))):
            break
        assert time.monotonic() < deadline, f"shard 0 never seen running in Flower's task list: {seen[-8:]}"
    _shot(page, "1-tasks-running-shard.png")
    print(f"task list while shard 0 runs ({time.monotonic() - scene.t0:.1f} s): {row}")
    scene.worker = row["worker"]
    missing = [c for c in ("started", "result") if c not in columns]
    if missing:
        problems.append(
            f"Flower's task list, as `vitbatch up` starts Flower, has no {' or '.join(missing)} column "
            f"(columns {columns}; Flower's default tasks_columns): the running shard's row shows "
            f"{row['visible']}, without its Started time or PROGRESS text. "
            "orchestrator.fleet.flowerauth (which `up`, `vitbatch flower` and compose all run) could default "
            "FLOWER_TASKS_COLUMNS to name,uuid,state,result,received,started,runtime,worker")
    shown = row["visible"]
    assert scene.job_id in shown["uuid"] and shown["state"] == row["state"], row
    if "result" in columns and not (re.search(r"\d+/150 images", shown["result"])
                                    and re.search(r"\d+ img/s", shown["result"])):
        problems.append(
            f"the running shard's PROGRESS text is cut in the task list (Flower caps the Result column "
            f"at 400 px, with an ellipsis): the row shows {shown['result']!r}, of {row['result']!r}; "
            "with done/total and img/s first (workers/progress.py) they stay in view")
    # Sorted by Received, newest first, and this is the first page.
    sorted_by = page.locator('.dataTables_scrollHead th[data-column="received"]')
    assert "sorting_desc" in (sorted_by.get_attribute("class") or ""), sorted_by.get_attribute("class")
    assert re.match(r"Showing 1 to \d+ of \d+ tasks", page.inner_text("#tasks-table_info")), \
        page.inner_text("#tasks-table_info")
    assert scene.worker.startswith("vitbatch-embedded-0@"), row
    assert not problems, "Flower does not show the truth:\n" + "\n".join(problems)


def test_task_page_shows_the_running_shard_with_its_progress(scene):
    page, seen, deadline = scene.page, [], time.monotonic() + 60
    while True:
        page.goto(f"{scene.flower}/task/{quote(scene.running_id)}")
        details = page.evaluate(DETAILS_JS)
        still_running = scene.running()
        seen.append((still_running, details.get("Status"), details.get("Result")))
        if (still_running and details.get("Status") == "PROGRESS" and scene.progress(details.get("Result", ""))
                and re.match(TIME, details.get("Received", "")) and re.match(TIME, details.get("Started", ""))):
            break
        assert still_running and time.monotonic() < deadline, \
            f"shard 0's task page never showed it running with its progress: {seen[-8:]}"
        time.sleep(0.3)
    _shot(page, "2-task-running-shard.png")
    assert 0 < scene.progress(details["Result"]) <= 150, details
    print(f"task page while shard 0 runs ({time.monotonic() - scene.t0:.1f} s): {details}")


def test_dashboard_and_worker_page_while_the_worker_is_busy(scene):
    # A busy solo worker sends no heartbeats and answers no inspection (README): the dashboard keeps the
    # Active count of its last heartbeat, and the worker's page may be refused. Whatever loads must not lie.
    page, worker = scene.page, scene.worker
    assert worker, "the task list test did not see which worker runs shard 0"
    page.goto(scene.flower + "/")
    page.wait_for_selector(f'#workers-table tbody a:text("{worker}")', timeout=10000)
    dashboard = {r["Worker"]: r for r in page.evaluate(WORKERS_JS)}
    busy = scene.running()
    _shot(page, "3-dashboard-while-busy.png")
    assert dashboard.get(worker, {}).get("Status") == "Online", dashboard
    print(f"dashboard while shard 0 {'runs' if busy else 'has ended'}: {dashboard[worker]}")
    response = page.goto(f"{scene.flower}/worker/{quote(worker)}")
    busy = scene.running()
    _shot(page, "3-worker-while-busy.png")
    if response.status == 200:
        page.click("#worker-tab-tasks")
        active = page.inner_text("#tab-tasks table:has(caption:text('Active tasks'))")
        assert not busy or scene.running_id in active, f"shard 0 runs, but the worker's active tasks are {active!r}"
        print(f"worker page while shard 0 {'runs' if busy else 'has ended'}: active tasks {active!r}")
    else:
        text = page.inner_text("body")
        assert response.status == 404 and re.search(r"Unknown worker|Unable to get stats", text), \
            (response.status, text[:500])
        print(f"worker page while shard 0 {'runs' if busy else 'has ended'}: HTTP 404, "
              f"{text.strip().splitlines()[-1]!r} (a busy solo worker answers no inspection)")


def test_task_list_shows_the_jobs_end(up, scene):
    status = scene.client.wait(scene.job_id, poll_s=0.25, timeout_s=120)
    assert status.state is JobState.FINISHED_WITH_FAILURES, (status, up.explain())
    scene.reason = status.failed_shards.get(1, "")
    assert scene.reason.startswith("quarantined after 2 deliveries") and "JSONDecodeError" in scene.reason, status
    deadline = time.monotonic() + 30
    while True:
        rows = {r["id"]: r for r in _task_rows(scene.page, scene.flower, scene.failed_id)}
        states = {i: r.get("state") for i, r in rows.items()}
        if states.get(scene.failed_id) == "FAILURE" and states.get(scene.running_id) == "SUCCESS":
            break
        assert time.monotonic() < deadline, f"Flower's task list never showed the job's end: {rows}"
        time.sleep(0.3)
    _shot(scene.page, "4-tasks-after-the-job.png")


def test_task_page_and_status_give_the_quarantine_reason(up, scene):
    assert scene.reason, "the job's end was not seen (the test before this one failed)"
    page = scene.page
    page.goto(f"{scene.flower}/task/{quote(scene.failed_id)}")
    failed = page.evaluate(DETAILS_JS)
    _shot(page, "5-task-quarantined-shard.png")
    assert failed.get("Status") == "FAILURE", failed
    shown = failed.get("Exception", "") + "\n" + failed.get("Traceback", "")
    assert scene.reason in shown, f"the quarantine reason {scene.reason!r} is not on shard 1's task page: {failed}"
    cli = subprocess.run([sys.executable, "-m", "orchestrator.commands.cli", "status", scene.job_id, "--json"],
                         env={**up.env, "VITBATCH_BROKER_URL": scene.broker}, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    told = json.loads(cli.stdout)
    assert told["state"] == "finished_with_failures", told
    assert told["failed_shards"] == {"1": scene.reason}, told


def test_worker_page_loads_once_the_worker_is_idle(scene):
    assert scene.reason, "the job's end was not seen (an earlier test failed)"
    deadline = time.monotonic() + 20  # Flower inspects the worker for 1 s a try
    while (response := scene.page.goto(f"{scene.flower}/worker/{quote(scene.worker)}")).status != 200:
        assert time.monotonic() < deadline, (response.status, scene.page.inner_text("body")[:500])
        time.sleep(0.5)
    _shot(scene.page, "6-worker-idle.png")
    assert scene.worker in scene.page.inner_text("body")


def test_metrics_and_pages_are_refused_without_credentials(scene):
    anonymous = scene.browser.new_context()
    try:
        for path in ("/metrics", "/tasks"):  # a page each: a refused navigation ends in Chromium's error page
            assert _status_without_credentials(anonymous.new_page(), scene.flower + path) == 401, path
        # Chromium leaves a refused navigation blank: for the screenshot, the same requests from a
        # page of Flower's that is open to all (/healthcheck), their answers written into it.
        refused = anonymous.new_page()
        refused.goto(scene.flower + "/healthcheck")
        answers = refused.evaluate(FETCH_JS, ["/metrics", "/tasks", "/api/tasks"])
        _shot(refused, "7-metrics-without-credentials.png")
        assert [status for _, status, _ in answers] == [401, 401, 401], answers
        response = scene.page.goto(scene.flower + "/metrics")
        assert response.status == 200 and "flower_events_total" in scene.page.inner_text("body"), response.status
    finally:
        anonymous.close()
