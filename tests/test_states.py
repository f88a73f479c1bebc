"""The state tables in batchd/states.py are the one truth: the journal's diagrams match them and the
journal refuses any other move."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import batchd.journal
from batchd.journal import Journal
from batchd.states import (CHUNK_MOVES, JOB_MOVES, ChunkState, IllegalMove, JobState, MediaState, StrayOutcome,
                           UploadState)


def diagram_moves(block_title: str) -> set[tuple[str, str]]:
    """The moves drawn in the journal's docstring diagram that follows ``block_title``."""
    doc = batchd.journal.__doc__
    block = doc[doc.index(block_title):].split("::\n\n", 1)[1].split("\n\n", 1)[0]
    moves = set()
    for line in block.splitlines():
        found = re.fullmatch(r"\s+(\w+)\s+→ (.+)", line)
        assert found, f"not a diagram line: {line!r}"
        moves |= {(found[1], target.strip()) for target in found[2].split("|")}
    return moves


def test_the_job_diagram_is_the_table():
    assert diagram_moves("Job states, from left to right") == {(a.value, b.value) for a, b in JOB_MOVES}


def test_the_chunk_diagram_is_the_table():
    assert diagram_moves("has its own small state machine") == {(a.value, b.value) for a, b in CHUNK_MOVES}


def test_the_design_notes_draw_the_same_moves():
    """docs/design.md's diagram is the one people read first: it must not drift from the tables either."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    block = text[text.index("## States"):].split("```\n", 2)[1]
    moves = {"job": set(), "chunk": set()}
    machine = None
    for line in block.splitlines():
        found = re.fullmatch(r"(?:(job|chunk):)?\s+(\w+)\s+→ (.+)", line)
        assert found, f"not a diagram line: {line!r}"
        machine = found[1] or machine
        moves[machine] |= {(found[2], target.strip()) for target in found[3].split("|")}
    assert moves["job"] == {(a.value, b.value) for a, b in JOB_MOVES}
    assert moves["chunk"] == {(a.value, b.value) for a, b in CHUNK_MOVES}


def test_every_state_is_reachable_and_every_job_can_end():
    reached = {JobState.CLAIMING}
    while True:
        more = {b for a, b in JOB_MOVES if a in reached} - reached
        if not more:
            break
        reached |= more
    assert reached == set(JobState)
    assert not [state for state in JobState if state != JobState.DONE and not any(a == state for a, _ in JOB_MOVES)]


def test_the_journal_refuses_a_move_not_in_the_table(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.add_job("j1", name="a", source="a.toml")
    journal.update_job("j1", state=JobState.RECEIVED)
    with pytest.raises(IllegalMove, match="'received' → 'fetched'"):
        journal.update_job("j1", state=JobState.FETCHED)
    assert journal.job("j1").state == JobState.RECEIVED, "the refused move left nothing behind"
    journal.update_job("j1", state=JobState.BUILDING)
    journal.add_chunk("j1", {"idx": 0, "display_name": "d0", "mode": "inline", "request_count": 1, "byte_size": 9})
    with pytest.raises(IllegalMove):
        journal.update_chunk("j1", 0, state=ChunkState.RUNNING)
    journal.update_chunk("j1", 0, state=ChunkState.SUBMITTING)
    journal.update_chunk("j1", 0, state=ChunkState.RUNNING)
    assert journal.chunk("j1", 0).state == ChunkState.RUNNING


def test_the_journal_reports_every_change_of_a_job(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    changed: list[str] = []
    journal.on_change = changed.append
    journal.add_job("j1", name="a", source="a.toml")
    journal.update_job("j1", state=JobState.RECEIVED)
    journal.add_chunk("j1", {"idx": 0, "display_name": "d0", "mode": "inline", "request_count": 1, "byte_size": 9})
    journal.update_chunk("j1", 0, state=ChunkState.SUBMITTING)
    assert changed == ["j1", "j1", "j1"]


def test_the_journal_binds_state_names_from_the_vocabulary_never_writes_them_into_a_query():
    """A state renamed in batchd.states cannot leave a query that still names the old one. (Migrations,
    in schema.py, keep the names of their time.)"""
    names = {state.value for state in (*JobState, *ChunkState, *UploadState, *MediaState, *StrayOutcome)}
    folder = Path(batchd.journal.__file__).parent
    written = {path.name: sorted(set(re.findall(r"'([a-z_]+)'", path.read_text())) & names)
               for path in folder.glob("*.py") if path.name != "schema.py"}
    assert {name: found for name, found in written.items() if found} == {}
