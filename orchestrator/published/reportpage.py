"""The HTML of a job's page (report.py gathers what it shows): one static file, no script, no
request to anywhere. Every string that comes from the data (keys, labels, captions, errors, the
spec) passes through `esc`: a key holding `<script>` is text on the page, never markup."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator.lifecycle.commits import JobRecord

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 150px; border: 1px solid #ccc; padding: 6px; font-size: 12px; overflow-wrap: anywhere; }
.card.error { border-color: #c00; } .card.kept { border: 2px solid #080; }
.why { color: #666; font-style: italic; }
.group { display: flex; gap: 10px; align-items: flex-start; margin-bottom: 12px; }
img.thumb { display: block; max-width: 96px; max-height: 96px; margin-bottom: 4px; }
"""


def esc(value: object) -> str:
    """Text for the page: quotes too, so it is safe in attributes as well."""
    return html.escape("" if value is None else str(value), quote=True)


@dataclass
class Card:
    """One sampled row: its key, what the job said about it, why it was picked, its thumbnail."""

    key: str
    lines: list[str]  # label / score / error lines, plain text
    why: str
    thumbnail: str | None = None  # a data: URI (base64 JPEG), or None
    missing: str = ""  # why there is no thumbnail
    css: str = ""


@dataclass
class Page:
    title: str
    record: dict[str, object]
    sections: list[str] = field(default_factory=list)  # rendered HTML blocks


def card_html(card: Card) -> str:
    image = (f'<img class="thumb" alt="{esc(card.key)}" src="{card.thumbnail}">' if card.thumbnail
             else f'<div class="why">{esc(card.missing or "no thumbnail")}</div>')
    lines = "".join(f"<div>{esc(line)}</div>" for line in card.lines)
    return (f'<div class="card {esc(card.css)}">{image}<div><b>{esc(card.key)}</b></div>{lines}'
            f'<div class="why">{esc(card.why)}</div></div>')


def cards_html(title: str, cards: Iterable[Card], note: str = "") -> str:
    body = "".join(card_html(card) for card in cards)
    return f'<h2>{esc(title)}</h2><p class="why">{esc(note)}</p><div class="cards">{body}</div>'


def groups_html(title: str, groups: Iterable[list[Card]], note: str = "") -> str:
    rows = "".join(f'<div class="group">{"".join(card_html(c) for c in group)}</div>' for group in groups)
    return f'<h2>{esc(title)}</h2><p class="why">{esc(note)}</p>{rows}'


def table_html(title: str, header: list[str], rows: Iterable[Iterable[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h2>{esc(title)}</h2><table><tr>{head}</tr>{body}</table>"


def image_html(title: str, data_uri: str) -> str:
    return f'<h2>{esc(title)}</h2><img alt="{esc(title)}" src="{data_uri}">'


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def record_rows(record: JobRecord) -> list[tuple[str, object]]:
    """The job's record as (field, value) lines, the most asked first; what it leaves empty is left out."""
    finished = record.finished_at
    first = [("job id", record.job_id), ("kind", record.kind), ("model fingerprint", record.model_fingerprint),
             ("items", record.items), ("processed", record.processed), ("errors", record.errors),
             ("carried over", record.carried_over), ("shards", record.shards),
             ("failed shards", record.failed_shards), ("wall s", record.wall_s),
             ("images per s", record.images_per_s), ("seconds per stage", record.stage_seconds),
             ("computed with", record.computed_with),
             ("finished (UTC)", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(finished)) if finished else None),
             ("vitbatch", record.vitbatch_version)]
    return [(name, value) for name, value in first if value not in (None, "", {})]


def render(page: Page) -> str:
    record = table_html("Record", ["field", "value"], page.record.items())
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{esc(page.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(page.title)}</h1>{record}{''.join(page.sections)}</body></html>")
