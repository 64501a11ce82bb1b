"""A page per job: `_report.html` at the output prefix, static HTML with everything inline.

What a job did, where people look: its record (model, fingerprint, counts, timings) and, from
a bounded sample drawn with a fixed seed (the same page every time), small thumbnails with
what the job said about each: error rows and the lowest-confidence rows first, each with the
reason it was picked; evaluate's per-class table and confusion matrix; attention overlays;
dedup groups (the kept image first); neighbors as the query and its matches. Thumbnails are
96 px JPEGs in base64, and their bytes are capped per page (MAX_IMAGE_BYTES).

Written by the publication of a succeeded job (finalize.publish, after `_SUCCESS.json`; a page
that cannot be made never fails the job) and by `vitbatch report <output>` for any output.
"""

from __future__ import annotations

import base64
import io
import logging
import random
from collections import defaultdict

from orchestrator.constants import JOB_SPEC_FILE, REPORT_FILE
from orchestrator.errors import ObjectNotFound, StorageError
from orchestrator.inputs.vectorplan import VectorPlan
from orchestrator.jobspec.kinds import KINDS
from orchestrator.jobspec.submitted import read_submitted
from orchestrator.lifecycle.commits import JobRecord
from orchestrator.published.reportpage import (
    Card,
    Page,
    cards_html,
    groups_html,
    image_html,
    record_rows,
    render,
    table_html,
)
from orchestrator.published.results import read_json, read_table, success_record
from orchestrator.store.storage import ObjectStore, join, normalize_uri

log = logging.getLogger(__name__)

SAMPLE_ROWS = 24  # cards per page (error and low-confidence rows first)
SAMPLE_GROUPS = 8  # dedup groups / neighbors queries shown
THUMBNAIL_PX = 96
MAX_IMAGE_BYTES = 1_500_000  # base64 image bytes per page; past it, cards say "page size cap"
MAX_SOURCE_BYTES = 32 * 1024 * 1024  # an input image larger than this is not fetched for a thumbnail
NOT_FILES = (".txt", ".jsonl", ".tar", "}")  # inputs whose keys are no object under the input (tar members)
PARQUET_ROW = "#row="  # a thumbnail reference to one row of a parquet input: <file uri>#row=<r>


class Thumbnails:
    """96 px JPEG data URIs of objects, within the page's byte budget."""

    def __init__(self, store: ObjectStore, budget_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.store, self.left = store, budget_bytes

    def of(self, uri: str | None) -> tuple[str | None, str]:
        """(data URI, "") or (None, why there is none). `uri` may name a parquet row: `<file>.parquet#<row>`."""
        if uri is None:
            return None, "no thumbnail: the input is a manifest or tar file"
        if self.left <= 0:
            return None, "thumbnail left out: the page's size cap is reached"
        try:
            data = encode_thumbnail(self._image_bytes(uri))
        except (StorageError, OSError, ValueError, KeyError, IndexError) as e:
            return None, f"no thumbnail: {type(e).__name__}"
        self.left -= len(data)
        return data, ""

    def _image_bytes(self, uri: str) -> bytes:
        if PARQUET_ROW not in uri:
            return self.store.read(uri, MAX_SOURCE_BYTES)
        file_uri, row = uri.rsplit(PARQUET_ROW, 1)
        return parquet_cell(self.store, file_uri, int(row))


def parquet_cell(store: ObjectStore, uri: str, row: int) -> bytes:
    """Row `row`'s image of a parquet input: its row group's image column only, by ranged reads."""
    import pyarrow.parquet as pq

    from orchestrator.inputs.parquetinputs import RangedFile, image_column

    handle = pq.ParquetFile(RangedFile(store, uri, store.info(uri).size))
    column = image_column(handle.schema_arrow, uri)
    for group in range(handle.metadata.num_row_groups):
        rows = handle.metadata.row_group(group).num_rows
        if row < rows:
            cell = handle.read_row_group(group, columns=[column]).column(0)[row].as_py()
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if not data or len(data) > MAX_SOURCE_BYTES:
                raise ValueError(f"row {row} of {uri} holds no image bytes within the cap")
            return data
        row -= rows
    raise IndexError(f"{uri} has no row {row}")


def encode_thumbnail(image_bytes: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at a fraction of full size
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def job_spec(output: str, record: JobRecord, store: ObjectStore) -> dict:
    submitted = read_submitted(store, join(output, record.job_dir, JOB_SPEC_FILE))
    return submitted.spec if submitted is not None else {}


def source_prefix(output: str, record: JobRecord, spec: dict, store: ObjectStore) -> str | None:
    """Where the rows' keys are objects: the input prefix; for a job over vectors (dedup, neighbors),
    the embed job's input, which the job's vector plan names."""
    source: object
    try:
        source = VectorPlan.read(join(output, record.job_dir), store).source.input
    except ObjectNotFound:  # a job over images: its own input
        source = spec.get("input")
    if not isinstance(source, str) or source.rstrip("/").lower().endswith(NOT_FILES):
        return None
    source = normalize_uri(source)
    if source.lower().endswith(".parquet"):  # one file as --input: its rows are keyed `<file name>/<row>`
        return source.rsplit("/", 1)[0]
    return source


def source_uri(prefix: str | None, key: str) -> str | None:
    if prefix is None:
        return None
    file, _, row = key.rpartition("/")
    try:
        if file.lower().endswith(".parquet") and row.isdigit():  # row r of a parquet input (no --id-column)
            return join(prefix, file) + PARQUET_ROW + row
        return join(prefix, key)
    except StorageError:  # a key that would leave the input is shown without its image
        return None


def pick_sample(rows: list[dict], size: int, seed: int) -> list[tuple[dict, str]]:
    """Up to `size` (row, why picked): error rows, then wrong predictions, then the lowest scores,
    then a seeded random draw of the rest."""
    rng = random.Random(seed)
    third = max(1, size // 3)
    errors = [r for r in rows if r.get("error")]
    picked = [(r, "error row") for r in rng.sample(errors, min(third, len(errors)))]
    good = [r for r in rows if not r.get("error")]
    wrong = [r for r in good if r.get("correct") is False]
    picked += [(r, f"misclassified as {r.get('predicted')}") for r in rng.sample(wrong, min(third, len(wrong)))]
    seen = {id(r) for r, _ in picked}
    scored = sorted((r for r in good if r.get("score") is not None and id(r) not in seen), key=lambda r: r["score"])
    picked += [(r, f"low confidence: score {r['score']:.3f}") for r in scored[:third]]
    seen = {id(r) for r, _ in picked}
    rest = [r for r in good if id(r) not in seen]
    picked += [(r, "random sample") for r in rng.sample(rest, min(size - len(picked), len(rest)))]
    return picked[:size]


def row_lines(row: dict) -> list[str]:
    """What the job said about one row, for its card."""
    lines = []
    if row.get("label") is not None:
        lines.append(f"label: {row['label']}" + (f" ({row['score']:.3f})" if row.get("score") is not None else ""))
    if row.get("predicted") is not None:
        lines.append(f"predicted: {row['predicted']}" + (f" ({row['score']:.3f})" if row.get("score") is not None
                                                         else ""))
    for name in ("topk_labels", "caption", "input_caption", "url", "input_url"):
        if row.get(name) is not None:
            lines.append(f"{name}: {row[name]}")
    if row.get("error"):
        lines.append(f"error: {row['error']}")
    return lines


def sample_cards(rows: list[dict], output: str, prefix: str | None, thumbs: Thumbnails, seed: int) -> list[Card]:
    cards = []
    for row, why in pick_sample(rows, SAMPLE_ROWS, seed):
        overlay = row.get("overlay")  # attention: the overlay PNG beside the output
        uri = join(output, overlay) if overlay else source_uri(prefix, str(row["key"]))
        # An error row's object could not be read or decoded: reading it again for a thumbnail would only
        # repeat the failure (and touch an object the job was refused, a second time).
        image, missing = (None, "no thumbnail: an error row") if row.get("error") else thumbs.of(uri)
        cards.append(Card(str(row["key"]), row_lines(row), why, image, missing, "error" if row.get("error") else ""))
    return cards


def evaluate_sections(output: str, record: JobRecord, store: ObjectStore) -> list[str]:
    folder = join(output, record.job_dir)
    metrics = read_json(store, join(folder, "metrics.json")) or {}
    sections = [table_html("Metrics", ["metric", "value"],
                           [(k, metrics.get(k)) for k in ("accuracy", "top5_accuracy", "macro_precision",
                                                          "macro_recall", "macro_f1", "n_images", "n_errors")])]
    per_class = metrics.get("per_class") or {}
    sections.append(table_html("Per class", ["class", "precision", "recall", "f1", "support"],
                               [(name, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support"))
                                for name, v in sorted(per_class.items())]))
    try:
        png = store.read(join(folder, "confusion_matrix.png"), MAX_IMAGE_BYTES)
        sections.append(image_html("Confusion matrix", "data:image/png;base64," + base64.b64encode(png).decode()))
    except StorageError:
        sections.append(table_html("Confusion matrix", ["labels"], [[metrics.get("confusion_labels")]]))
    return sections


def dedup_groups(rows: list[dict], prefix: str | None, thumbs: Thumbnails, seed: int) -> list[list[Card]]:
    """Groups with removed rows, the kept row first, then what it replaced with their cosine."""
    removed: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if not row.get("kept") and row.get("duplicate_of") is not None:
            removed[str(row["duplicate_of"])].append(row)
    chosen = sorted(random.Random(seed).sample(sorted(removed), min(SAMPLE_GROUPS, len(removed))))
    groups = []
    for kept in chosen:
        group = [Card(kept, ["kept"], f"{len(removed[kept])} duplicate(s) removed", *thumbs.of(source_uri(prefix, kept)),
                      css="kept")]
        for row in removed[kept]:
            group.append(Card(str(row["key"]), [f"cosine {row.get('cosine', 0):.4f}", f"cluster {row.get('cluster')}"],
                              "removed", *thumbs.of(source_uri(prefix, str(row["key"])))))
        groups.append(group)
    return groups


def neighbor_groups(rows: list[dict], prefix: str | None, thumbs: Thumbnails, seed: int) -> list[list[Card]]:
    """The query first, then its matches, best first (up to five)."""
    groups = []
    for row in sorted(random.Random(seed).sample(rows, min(SAMPLE_GROUPS, len(rows))), key=lambda r: str(r["key"])):
        group = [Card(str(row["key"]), [], "query", *thumbs.of(source_uri(prefix, str(row["key"]))), css="kept")]
        for match, cosine in list(zip(row.get("neighbors") or [], row.get("cosines") or []))[:5]:
            group.append(Card(str(match), [f"cosine {cosine:.4f}"], "match", *thumbs.of(source_uri(prefix, str(match)))))
        groups.append(group)
    return groups


def sample_section(rows: list[dict], output: str, prefix: str | None, thumbs: Thumbnails, seed: int) -> str:
    note = (f"{len(rows)} rows, {sum(bool(r.get('error')) for r in rows)} errors; up to {SAMPLE_ROWS} drawn "
            f"with seed {seed}: error rows and the lowest-confidence rows first")
    return cards_html("Sample", sample_cards(rows, output, prefix, thumbs, seed), note)


def duplicates_section(rows: list[dict], output: str, prefix: str | None, thumbs: Thumbnails, seed: int) -> str:
    return groups_html("Duplicate groups", dedup_groups(rows, prefix, thumbs, seed),
                       f"{len(rows)} rows; groups drawn with seed {seed}, kept image first")


def neighbors_section(rows: list[dict], output: str, prefix: str | None, thumbs: Thumbnails, seed: int) -> str:
    return groups_html("Queries and their neighbors", neighbor_groups(rows, prefix, thumbs, seed),
                       f"{len(rows)} queries; drawn with seed {seed}")


# The body of a page by what its kind's record says it shows (JobKind.page); the rest show a sample of rows.
BODIES = {"duplicates": duplicates_section, "neighbors": neighbors_section}


def build_page(output: str, store: ObjectStore, seed: int = 0) -> str:
    """The page of the latest succeeded job at `output`, as HTML."""
    output = normalize_uri(output)
    record = success_record(output, store)
    spec = job_spec(output, record, store)
    kind = record.kind or str(spec.get("kind"))
    facts = dict(record_rows(record))
    facts.update({k: spec[k] for k in ("model", "input", "embeddings", "queries") if spec.get(k)})
    page = Page(f"vitbatch {kind} job {record.job_id}", facts)
    shows = KINDS[kind].page if kind in KINDS else "rows"  # a record of a kind this version does not know: its rows
    if shows == "model":  # its output is a model, not rows
        return render(page)
    rows = read_table(output, store).to_pylist()
    prefix, thumbs = source_prefix(output, record, spec, store), Thumbnails(store)
    if shows == "evaluation":
        page.sections += evaluate_sections(output, record, store)
    page.sections.append(BODIES.get(shows, sample_section)(rows, output, prefix, thumbs, seed))
    return render(page)


def write_report(output: str, store: ObjectStore, seed: int = 0) -> str:
    """Write the page at `<output>/_report.html`; returns its URI."""
    output = normalize_uri(output)
    uri = join(output, REPORT_FILE)
    store.write(uri, build_page(output, store, seed).encode())
    return uri


def write_report_quietly(output: str, store: ObjectStore) -> None:
    """The publication's call: the job is live already, so a page that cannot be made is a warning."""
    try:
        write_report(output, store)
    except Exception as e:  # noqa: BLE001 - any failure here must not fail a published job
        log.warning("no page for the job at %s: %s: %s (`vitbatch report %s` tries again)",
                    output, type(e).__name__, e, output)
