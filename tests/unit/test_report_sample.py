"""The page's sample: bounded, the same for the same seed, error rows and the lowest scores first, and
every string from the data escaped."""

from __future__ import annotations

from orchestrator.published.report import pick_sample
from orchestrator.published.reportpage import Card, card_html

ROWS = ([{"key": f"k{i}", "score": i / 100, "error": None} for i in range(100)]
        + [{"key": f"bad{i}", "score": None, "error": "not an image"} for i in range(3)])


def test_the_sample_is_bounded_seeded_and_puts_errors_then_low_scores_first():
    picked = pick_sample(ROWS, 24, seed=0)
    assert len(picked) == 24 and picked == pick_sample(ROWS, 24, seed=0)
    assert [why for _, why in picked[:3]] == ["error row"] * 3
    assert [row["key"] for row, _ in picked[3:11]] == [f"k{i}" for i in range(8)], "the 8 lowest scores next"
    assert len({row["key"] for row, _ in picked}) == 24, "no row twice"
    assert pick_sample(ROWS, 24, seed=1)[11:] != picked[11:], "another seed draws another random part"


def test_a_card_escapes_key_lines_and_reason():
    html = card_html(Card('<script>alert("k")</script>', ["label: <img src=x onerror=alert(1)>"], "why <b>"))
    assert "<script>" not in html and "<img src=x" not in html and "<b>why" not in html
    assert "&lt;script&gt;alert(&quot;k&quot;)&lt;/script&gt;" in html
