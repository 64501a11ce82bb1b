"""The page of a job (`_report.html`), written with its output and by `vitbatch report`: opened in
headless Chromium it shows the record and the sample without a console error, and keys and
captions holding markup are text, never elements."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import ROOT

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.report import MAX_IMAGE_BYTES, SAMPLE_ROWS
from workers.context import WorkerContext
from workers.inprocess import run_local

ARTIFACTS = Path(os.environ.get("VITBATCH_ARTIFACTS") or ROOT / "tests" / "artifacts") / "report-page"
N_IMAGES = 20  # with the key and the broken file, 22 rows: under SAMPLE_ROWS, every row has its card
SCRIPT_KEY = "evil<script>window.hacked=1;<b>bold"  # a file name (no '/'); unescaped, it would swallow the page
SCRIPT_CAPTION = "</div><script>window.hacked=2</script><img src=x onerror='window.hacked=3'>"


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def run(kind: str, input_uri: str, output: str, model_dir, **options) -> str:
    spec = parse_spec({"kind": kind, "input": input_uri, "output": output, "model": str(model_dir), "device": "cpu",
                       **options})
    return run_local(spec, WorkerContext(Settings()))[0]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("VITBATCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("no Chromium: install Debian's chromium (./.ci/test-tools as root) or set VITBATCH_CHROMIUM",
                    pytrace=False)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


def open_page(browser, path, screenshot: str) -> tuple[object, list[str], list[str]]:
    """The page, its console errors and the dialogs it tried to open; a full-page screenshot kept."""
    page = browser.new_page()
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
    return page, errors, dialogs


def test_a_classify_page_shows_the_record_and_the_sample_and_a_script_key_is_text(tmp_path, hf_model_dir,
                                                                                  browser):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        (images / f"img-{i:02d}.png").write_bytes(png(i))
    (images / f"{SCRIPT_KEY}.png").write_bytes(png(99))
    (images / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "out"
    job_id = run("classify", str(images), str(output), hf_model_dir, top_k=2)

    report = output / "_report.html"
    assert report.exists(), "the publication writes the page"
    assert report.stat().st_size < MAX_IMAGE_BYTES + 200_000
    page, errors, dialogs = open_page(browser, report, "classify-page.png")
    assert errors == [] and dialogs == []
    text = page.inner_text("body")
    assert job_id in text and f"{N_IMAGES + 2}" in text, text[:500]
    cards = page.locator(".card")
    assert cards.count() == N_IMAGES + 2 <= SAMPLE_ROWS
    assert "error row" in cards.first.inner_text() and "broken.png" in cards.first.inner_text(), \
        "the error row comes first, with its reason"
    assert page.locator(".card img.thumb").count() == N_IMAGES + 1, "a thumbnail for every image but the broken one"
    assert page.locator("script").count() == 0, "the key's <script> is no element"
    assert page.locator("b").count() == cards.count(), "the page's own bold key labels only, none from a key"
    assert page.evaluate("window.hacked === undefined")
    assert SCRIPT_KEY + ".png" in text, "the key is shown as the text it is"


def test_a_caption_with_markup_renders_as_text_and_report_rewrites_the_page(tmp_path, hf_model_dir, browser):
    rows = {"image": [png(i) for i in range(4)], "caption": [SCRIPT_CAPTION] * 4}
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table(rows), data / "shard.parquet")
    output = tmp_path / "captions"
    run("embed", str(data / "shard.parquet"), str(output), hf_model_dir, pooling=["cls"], keep_columns=["caption"])
    (output / "_report.html").unlink()
    written = subprocess.run([sys.executable, "-m", "orchestrator.commands.cli", "report", str(output)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert (output / "_report.html").exists() and "_report.html" in written.stdout

    page, errors, dialogs = open_page(browser, output / "_report.html", "caption-page.png")
    assert errors == [] and dialogs == []
    assert page.locator("script").count() == 0 and page.locator(".card img[src='x']").count() == 0
    assert page.evaluate("window.hacked === undefined")
    assert SCRIPT_CAPTION in page.inner_text("body"), "the caption is shown as the text it is"
    assert page.locator(".card").count() == 4
    assert page.locator(".card img.thumb").count() == 4, "each parquet row's image cell is its thumbnail"


def run_evaluate_here(input_uri: str, output: str, model_dir) -> str:
    """An evaluate job in this process as its task runs it (workers.tasks._single_task), then published."""
    import json as jsonlib
    import time

    from orchestrator import __version__
    from orchestrator.constants import JOB_SPEC_FILE
    from orchestrator.lifecycle.commits import JobRecord, JobStamp
    from orchestrator.published.outputs import job_dir, new_job_id, spec_digest
    from orchestrator.published.publication import publish
    from orchestrator.store.storage import join, normalize_uri, relative_key
    from workers.training.evaluation import evaluate
    from workers.writers import commit_shard, written_files

    spec = parse_spec({"kind": "evaluate", "input": input_uri, "output": output, "model": str(model_dir),
                       "device": "cpu", "label_column": "label"})
    job_id, ctx, started = new_job_id(), WorkerContext(Settings()), time.time()
    folder = job_dir(normalize_uri(output), job_id)
    fields = {"job_id": job_id, "spec_sha256": spec_digest(spec.model_dump_json())}
    ctx.store.write(join(folder, JOB_SPEC_FILE), jsonlib.dumps({**fields, "spec": spec.model_dump()}).encode())
    work = evaluate(spec.model_copy(update={"output": folder}), job_id, ctx, lambda _: None)
    marker = commit_shard(ctx.store, folder, 0, {}, JobStamp(**fields), work, written=written_files(ctx.store, folder))
    record = JobRecord.build(
        job_id=job_id, spec_sha256=fields["spec_sha256"], kind="evaluate",
        job_dir=relative_key(normalize_uri(output), folder), markers=[marker], items=marker.rows,
        processed=marker.rows, errors=marker.errors, shards=1, failed_shards={}, carried=0,
        wall_s=time.time() - started, finished_at=time.time(), version=__version__)
    publish(ctx.store, normalize_uri(output), record, True, jsonlib.loads(spec.model_dump_json()))
    return job_id


def test_an_evaluate_page_shows_the_per_class_table_the_confusion_matrix_and_errors_first(tmp_path, hf_model_dir,
                                                                                       browser):
    from helpers_models import LABELS

    labels = [LABELS[i % len(LABELS)] for i in range(12)]
    images = [png(i) for i in range(11)] + [b"truncated"]
    pq.write_table(pa.table({"image": images, "label": labels}), tmp_path / "test.parquet")
    output = tmp_path / "eval"
    job_id = run_evaluate_here(str(tmp_path / "test.parquet"), str(output), hf_model_dir)

    from deltalake import DeltaTable

    predictions = DeltaTable(str(output)).to_pyarrow_table()  # evaluate's predictions are its table
    assert predictions.num_rows == 12 and set(predictions.column_names) >= {"key", "label", "predicted", "correct"}

    page, errors, dialogs = open_page(browser, output / "_report.html", "evaluate-page.png")
    assert errors == [] and dialogs == []
    text = page.inner_text("body")
    assert job_id in text and "Per class" in text and "Confusion matrix" in text
    per_class = page.locator("table").nth(2).locator("tr")
    assert per_class.count() >= 2, "a row per class under the header"
    assert page.locator('img[alt="Confusion matrix"]').count() == 1
    cards = page.locator(".card")
    assert cards.count() == 12 and "error row" in cards.first.inner_text()
    assert page.locator(".card img.thumb").count() == 11, "a thumbnail from every parquet row but the truncated one"
    whys = [cards.nth(i).locator(".why").last.inner_text() for i in range(cards.count())]
    first_other = next(i for i, why in enumerate(whys) if not why.startswith(("error row", "misclassified")))
    assert all(not why.startswith("misclassified") for why in whys[first_other:]), whys
