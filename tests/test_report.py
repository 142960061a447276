"""tools/report.py: one self-contained HTML page, checked by parsing it.

Every embedded image must decode, nothing may point outside the file, and the
numbers in its tables must equal the CSVs' (and the summary tool's rows).
"""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pandas as pd
import pytest

from nemoe.schema import EVENT_COLUMNS, STATE_COLUMNS
from tests.test_tools import EVENTS, csv_text, event, write_logs
from tools import report, summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Images, links, scripts, tables (by class: rows of cell texts) and <pre> texts of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.tags = [], [], set()
        self.tables: dict[str, list[list[str]]] = {}
        self.pres: list[str] = []
        self._table, self._row, self._cell, self._pre = None, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)


def with_plasticity(log_dir):
    """Add head and layer plasticity to a hand-written run: plasticity.csv rows and events."""
    rows = []
    for step in range(1, 17):
        for layer in (0, 1):
            for head in (0, 1):
                gate = 0.0 if (layer, head) == (1, 0) and 6 <= step < 12 else 1.0
                rows.append({"step": step, "tokens": 64 * step, "granularity": "head", "layer": layer,
                             "unit": f"h{head}", "name": "gate", "value": gate})
                rows.append({"step": step, "tokens": 64 * step, "granularity": "head", "layer": layer,
                             "unit": f"h{head}", "name": "entropy", "value": 0.5 + 0.01 * step})
            rows.append({"step": step, "tokens": 64 * step, "granularity": "layer", "layer": layer,
                         "unit": f"L{layer}", "name": "vitality", "value": 1.0 - 0.02 * step * (layer + 1)})
    (log_dir / "plasticity.csv").write_text(csv_text(rows, STATE_COLUMNS))
    more = [dict(event(6, 1, "prune", -1), granularity="head", unit="h0", cause="entropy 0.9 vs 0.8"),
            dict(event(12, 1, "grow", -1), granularity="head", unit="h0", cause="slot free")]
    events = sorted(EVENTS + more, key=lambda e: e["step"])
    (log_dir / "events.csv").write_text(csv_text(events, EVENT_COLUMNS))
    return log_dir


def render(tmp_path, draw: bool = True):
    """(log folder, page) of a hand-written run with head and layer plasticity; `draw` False
    leaves the pixels out (drawing six figures takes seconds)."""
    log_dir = with_plasticity(write_logs(tmp_path / "logs" / "hand"))
    out = tmp_path / "report.html"
    with pytest.MonkeyPatch.context() as patch:
        if not draw:
            import matplotlib.pyplot as plt
            patch.setattr(report, "png", lambda fig: plt.close(fig) or "data:image/png;base64,")
        assert report.main([str(log_dir), "-o", str(out)]) == 0
    return log_dir, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return render(tmp_path_factory.mktemp("report"), draw=False)


@pytest.mark.slow
def test_report_is_self_contained_and_every_image_decodes(tmp_path):
    from PIL import Image
    _, text = render(tmp_path)
    html = Page(text)
    # experts, training, lineage, head gate and entropy, layer vitality
    assert len(html.images) == 6
    for src in html.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.size[0] > 500 and image.size[1] > 200
    assert all(link.startswith("#") for link in html.links), html.links   # in-page anchors only
    assert not {"script", "link", "iframe", "object"} & html.tags
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text


def test_report_numbers_equal_the_csvs(page):
    log_dir, text = page
    html = Page(text)
    assert len(html.images) == 6 and all(link.startswith("#") for link in html.links)
    # The summary table is tools/summary.py's, row for row.
    assert [tuple(r) for r in html.tables["summary"]] == [(k, v) for k, v in summary.rows(log_dir)]
    # Held-out loss: a row per evaluation, a column per source (mixed last).
    evals = pd.read_csv(log_dir / "eval.csv")
    header, *rows = html.tables["eval"]
    assert header == ["step", "tokens", "prose loss", "code loss", "mixed (all) loss"]
    assert [int(r[0]) for r in rows] == sorted(set(evals["step"]))
    for r in rows:   # every loss to 4 decimals, as the text log's Eval lines (7.5000, never 7.5 beside 7.25)
        at = evals[evals["step"] == int(r[0])].set_index("source")["loss"]
        assert r[2:] == [f"{at[s]:.4f}" for s in ("prose", "code", "all")]
    # Events: every row of events.csv (all granularities), every column.
    events = pd.read_csv(log_dir / "events.csv", dtype=str, keep_default_na=False)
    header, *rows = html.tables["events"]
    assert header == EVENT_COLUMNS and len(rows) == len(events)
    for shown, (_, logged) in zip(rows, events.iterrows()):
        for column, value in zip(EVENT_COLUMNS, shown):
            try:
                assert float(value) == pytest.approx(float(logged[column]), rel=1e-6), column
            except ValueError:
                assert value == logged[column], column
    assert "head prune 1" in text and "head grow 1" in text
    # The lineage as text, and the config as written.
    assert any("founder" in p and "split from 0 @ step 4" in p for p in html.pres)
    assert (log_dir / "config.yaml").read_text() in html.pres


def test_report_of_a_run_without_plasticity_or_events(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    drawn = []
    monkeypatch.setattr(report, "png", lambda fig: drawn.append(fig) or plt.close(fig) or "data:image/png;base64,")
    log_dir = write_logs(tmp_path / "logs" / "quiet", events=[])
    out = tmp_path / "r.html"
    assert report.main([str(log_dir), "-o", str(out)]) == 0
    html = Page(out.read_text())
    assert len(html.images) == len(drawn) == 3, "experts, training, lineage (the founders' lifelines)"
    assert "No structural events yet." in out.read_text()


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_report_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0 and "self-contained HTML" in capsys.readouterr().out
