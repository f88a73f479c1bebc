"""Generated hostile inbox entries against the real daemon (tests/hostile.py; bench/fuzz.py runs ten
thousand and more): it keeps serving, loses nothing, bounds every error and reads nothing outside the
inbox."""

from __future__ import annotations

import os

import pytest

from batchd.testing import Workspace
from hostile import MESSAGE_BOUND, MESSAGE_CAP, Generator, audit_environment, check_outcome

ENTRIES = int(os.environ.get("BATCHD_FUZZ_ENTRIES", "250"))


@pytest.mark.parametrize("seed", [1])
def test_hostile_entries_are_each_taken_or_rejected_and_the_rest_still_succeed(workspace: Workspace, seed: int):
    workspace.configure(incomplete_grace_seconds=0.5)
    bait = workspace.root / "bait"
    audit = workspace.root / "audit"
    generator = Generator(seed, workspace.inbox, bait)
    entries = [generator.entry() for _ in range(ENTRIES)]

    result = workspace.batchd("run", "--once", timeout=280, **audit_environment(audit, bait))

    assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: some jobs were rejected
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    outcome = check_outcome(entries, workspace.outbox, audit)
    assert outcome.lost == [], outcome.lost[:20]
    assert outcome.valid_not_succeeded == [], outcome.valid_not_succeeded[:5]
    assert outcome.bait_reads == [], outcome.bait_reads[:5]
    assert outcome.longest_message < MESSAGE_BOUND
    assert outcome.longest_rejection <= MESSAGE_CAP, "every rejection's message is cut at [limits] error_chars"
    assert outcome.rejected > ENTRIES // 3 and outcome.succeeded >= sum(entry.valid for entry in entries)


def test_the_audit_hook_sees_a_read_of_the_bait(workspace: Workspace):
    """The bait check above could fail: a manifest that is read from the bait folder is seen."""
    bait = workspace.root / "bait"
    audit = workspace.root / "audit"
    Generator(0, workspace.inbox, bait)
    env = audit_environment(audit, bait)

    result = workspace.batchd("submit", str(bait / "secret.toml"), **env)  # a read the user asked for

    assert result.returncode == 0, result.stderr
    assert set(check_outcome([], workspace.outbox, audit).bait_reads) == {str(bait / "secret.toml")}
