"""The host-side benchmark rows count a sample only when pyro did what it should."""

from __future__ import annotations

import pytest
from bench import host
from bench.stats import Table


def test_every_host_side_row_takes_its_samples() -> None:
    table = Table()
    host.measure_manifest(table, 2, dirs=2, files_per_dir=3)
    host.measure_bombs(table, 1)
    assert [(row.metric, len(row.samples), row.note) for row in table.rows] == [
        (host.MANIFEST_FIRST_ROW[0], 2, None),
        (host.MANIFEST_CACHED_ROW[0], 2, None),
        (host.SEED_BOMB_ROW[0], 1, None),
        (host.EXPORT_BOMB_ROW[0], 1, None),
    ]


def test_an_accepted_bomb_is_no_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.seeds, "ingest_seed", lambda *_args: [])
    table = Table()
    host.measure_bombs(table, 2)
    seed_row, export_row = table.rows
    assert (seed_row.samples, seed_row.note) == ([], "sample(s) not counted: the bomb was accepted")
    assert len(export_row.samples) == 2
