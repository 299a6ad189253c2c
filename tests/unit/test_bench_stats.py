"""The benchmark's statistics and table rendering (no VM, no timing)."""

from __future__ import annotations

import json

import pytest
from bench.stats import MISSING, Row, Table, percentile, summarize


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.5], 50) == 7.5
    assert percentile([7.5], 99) == 7.5


def test_percentile_refuses_empty_input_and_bad_rank() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    assert summarize([]) is None
    stats = summarize([float(v) for v in range(1, 101)])
    assert stats is not None
    assert (stats.n, stats.min, stats.max) == (100, 1.0, 100.0)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5)


def test_row_cells_format_with_its_decimals() -> None:
    row = Row("exec", "ms", decimals=2)
    for value in (1.0, 2.0, 3.0):
        row.add(value)
    assert row.cells() == ["exec", "3", "1.00", "2.00", "2.98", "ms"]
    empty = Row("nothing", "MiB")
    assert empty.cells() == ["nothing", "0", MISSING, MISSING, MISSING, "MiB"]


def test_table_keeps_declaration_order_and_reuses_rows() -> None:
    table = Table()
    first = table.row("a", "ms")
    table.row("b", "ms")
    assert table.row("a", "ignored") is first
    assert [row.metric for row in table.rows] == ["a", "b"]


def test_explain_marks_empty_and_partial_rows_but_keeps_existing_notes() -> None:
    table = Table()
    empty = table.row("empty", "ms")
    partial = table.row("partial", "ms")
    partial.add(1.0)
    noted = table.row("noted", "ms")
    noted.note = "already said"
    table.explain(table.rows, "VMError: boom")
    assert empty.note == "VMError: boom"
    assert partial.note == "partial: VMError: boom"
    assert noted.note == "already said"


def test_render_has_header_columns_and_aligned_rows() -> None:
    table = Table()
    boot = table.row("boot to agent-ready", "ms", decimals=0)
    for value in (2600.4, 2700.0):
        boot.add(value)
    table.row("ping", "us", decimals=0).add(200.0)
    text = table.render(["host: 2 CPUs", "backend: qemu-tcg"])
    lines = text.splitlines()
    assert lines[:3] == ["host: 2 CPUs", "backend: qemu-tcg", ""]
    titles = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert titles == ["metric", "n", "min", "p50", "p99", "unit"]
    assert set(lines[4]) <= {"|", "-"}
    body = lines[5:]
    assert len(body) == 2
    assert len({len(line) for line in lines[3:]}) == 1  # every table line equally wide
    cells = [cell.strip() for cell in body[0].strip("|").split("|")]
    assert cells == ["boot to agent-ready", "2", "2600", "2650", "2699", "ms"]


def test_render_adds_a_note_column_only_when_a_row_has_a_note() -> None:
    table = Table()
    table.row("measured", "ms").add(1.0)
    assert "note" not in table.render().splitlines()[0]
    table.row("firecracker", "ms").note = "skipped: /dev/kvm is missing"
    lines = table.render().splitlines()
    assert lines[0].rstrip("| ").endswith("note")
    assert lines[-1].split("|")[-2].strip() == "skipped: /dev/kvm is missing"
    assert lines[-1].split("|")[2].strip() == "0"


def test_to_dict_is_json_with_samples_and_summary() -> None:
    table = Table()
    row = table.row("put 1 MiB", "MiB/s")
    row.add(50.0)
    table.row("missing", "ms").note = "not run"
    document = json.loads(json.dumps(table.to_dict()))
    assert document[0]["samples"] == [50.0]
    assert document[0]["summary"]["p50"] == 50.0
    assert document[1] == {
        "metric": "missing",
        "unit": "ms",
        "samples": [],
        "summary": None,
        "note": "not run",
    }
