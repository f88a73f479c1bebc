"""Inbox faults at the daemon (reliability.md B8, filesystem and input faults): lost events, entries
that are no regular file, file names that are no text, empty files, stale producer temp files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchd.testing import DaemonRunner, Workspace
from invariants import Dropped, assert_invariants
from test_daemon import TRANSLATE, remote_jobs

#: Enough for several ticks of claims (CLAIMS_PER_TICK = 50) yet few enough that a machine whose disk
#: takes 20 ms a flush still finishes well within the timeout; BATCHD_RESCAN_MANIFESTS=1000 by hand.
RESCAN_MANIFESTS = int(os.environ.get("BATCHD_RESCAN_MANIFESTS", "300"))


def backdate(path: Path, seconds: float) -> None:
    old = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(old, old), follow_symlinks=False)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_with_file_system_events_disabled_the_rescan_alone_takes_every_manifest(workspace: Workspace,
                                                                                 daemon: DaemonRunner):
    """As on an inotify queue overflow or an NFS mount: no event ever arrives (watch_backend = "none")."""
    workspace.configure(watch_backend="none", rescan_seconds=0.5, settle_seconds=0.05, chunk_max_requests=1000)
    process = daemon.start()
    dropped = []
    for n in range(RESCAN_MANIFESTS):
        path = workspace.drop(f"m{n:04d}.toml", f'task = "translate"\ntexts = ["Hello {n}"]\nlanguages = ["French"]\n')
        dropped.append(Dropped.of(path))
    workspace.wait_for(lambda: len(workspace.outbox_folders()) >= RESCAN_MANIFESTS, timeout=600,
                       what=f"{RESCAN_MANIFESTS} manifests delivered")
    assert process.stop() == 0
    assert "watcher" not in process.output()  # no watcher was ever started, or restarted
    report = assert_invariants(workspace, dropped, remote_jobs(workspace))
    assert report["folders"] == RESCAN_MANIFESTS
    assert all(summary["state"] == "succeeded" for summary in workspace.delivered().values())


def test_entries_that_are_no_regular_file_are_rejected_with_a_reason_and_kept(workspace: Workspace, tmp_path):
    """Postfix's mail_open_ok: only regular files. A symlink is never followed, a FIFO never opened
    (it would block the daemon), a folder never read; each is moved whole into its rejected folder."""
    target = tmp_path / "elsewhere.toml"
    target.write_text(TRANSLATE)
    (workspace.inbox / "link.toml").symlink_to(target)
    (workspace.inbox / "folder.toml").mkdir()
    (workspace.inbox / "folder.toml" / "notes.txt").write_text("someone's file")
    os.mkfifo(workspace.inbox / "pipe.json")
    workspace.drop("good.toml", TRANSLATE)

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr  # jobs were rejected
    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    for name, source, kind in (("link", "link.toml", "symlink"), ("folder", "folder.toml", "directory"),
                               ("pipe", "pipe.json", "fifo")):
        summary = delivered[name]
        assert summary["state"] == "rejected"
        assert summary["error"]["code"] == "not_a_regular_file" and summary["error"]["kind"] == kind
        assert source in summary["error"]["message"] and kind in summary["error"]["message"]
    kept = workspace.outbox
    assert os.readlink(kept / "link" / "link.toml") == str(target)
    assert target.read_text() == TRANSLATE, "what the symlink points to is left alone"
    assert (kept / "folder" / "folder.toml" / "notes.txt").read_text() == "someone's file"
    assert (kept / "pipe" / "pipe.json").is_fifo()
    assert os.listdir(workspace.inbox) == []
    assert len(remote_jobs(workspace)) == 1, "only the good manifest reached the service"


def test_a_file_name_that_is_not_utf8_is_rejected_under_a_readable_name(workspace: Workspace):
    """Journal, outbox folder and display name all need text; the daemon must not crash on it (it did)."""
    raw_name = os.path.join(os.fsencode(workspace.inbox), b"caf\xe9.toml")
    with open(raw_name, "wb") as manifest:
        manifest.write(TRANSLATE.encode())
    workspace.drop("good.toml", TRANSLATE.replace("Hello", "Hi"))

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr
    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    rejected = delivered["caf\\xe9"]
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "file_name_not_utf8"
    assert "the file name 'caf\\xe9.toml' is not valid UTF-8" in rejected["error"]["message"]
    assert (workspace.outbox / "caf\\xe9" / "caf\\xe9.toml").read_text() == TRANSLATE, "the bytes are kept"
    assert os.listdir(workspace.inbox) == []


def test_a_non_utf8_name_claimed_just_before_a_crash_is_finished_by_recovery(workspace: Workspace):
    """K3 for a renamed source: the journal knows the readable name, the inbox holds the raw one."""
    raw_name = os.path.join(os.fsencode(workspace.inbox), b"na\xefve.toml")
    with open(raw_name, "wb") as manifest:
        manifest.write(TRANSLATE.encode())

    crashed = workspace.start("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.wait(120) == -9
    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr
    assert set(workspace.delivered()) == {"na\\xefve"}
    assert workspace.delivered()["na\\xefve"]["error"]["code"] == "file_name_not_utf8"


def test_a_long_name_that_is_not_utf8_is_claimed_under_a_shortened_name_and_recovered(workspace: Workspace):
    """250 bytes that are not UTF-8 read as 1,000 characters (``\\xNN`` each): too long for the job's spool
    file or outbox folder, so its claim failed, and again in recovery at every start with its row left
    'claiming'. The readable name is cut to 255 bytes with a digest of the whole; killed right after the
    claim, the restart finishes it and the other manifest still runs."""
    raw_name = os.path.join(os.fsencode(workspace.inbox), b"\xff" * 250 + b".toml")
    with open(raw_name, "wb") as manifest:
        manifest.write(TRANSLATE.encode())

    crashed = workspace.start("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.wait(120) == -9, crashed.output()[-3000:]
    workspace.drop("good.toml", TRANSLATE)
    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr[-3000:]  # the long name is rejected, and nothing crashed
    assert "Traceback" not in result.stderr + crashed.output()
    delivered = workspace.delivered()
    assert delivered.pop("good")["state"] == "succeeded"
    [(folder, rejected)] = delivered.items()
    assert folder.startswith("\\xff\\xff") and "…-" in folder and len(folder.encode()) <= 250
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "file_name_not_utf8"
    assert (workspace.outbox / folder / rejected["manifest"]).read_text() == TRANSLATE, "the bytes are kept"
    assert os.listdir(workspace.inbox) == []


def test_an_empty_manifest_is_rejected_as_empty(workspace: Workspace):
    (workspace.inbox / "empty.toml").write_bytes(b"")
    (workspace.inbox / "blank.json").write_text("\n  \n")
    workspace.configure(incomplete_grace_seconds=0.3)

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1
    for name in ("empty", "blank"):
        summary = workspace.delivered()[name]
        assert summary["state"] == "rejected"
        assert summary["error"]["reason"] == "the file is empty"


def test_stale_producer_temp_files_are_reaped_and_fresh_ones_and_other_dotfiles_kept(workspace: Workspace,
                                                                                    daemon: DaemonRunner):
    """K1: a producer killed before its rename leaves its temp file for good; Maildir reaps after 36 h."""
    workspace.configure(temp_max_age_seconds=3600)
    stale = [workspace.inbox / ".job.toml.tmp", workspace.inbox / "upload.toml.part", workspace.inbox / "x.TMP"]
    fresh = workspace.inbox / ".other.toml.tmp"
    kept = [workspace.inbox / ".gitkeep", workspace.inbox / "notes.toml~", workspace.inbox / ".job.toml.swp"]
    for path in stale + kept + [fresh]:
        path.write_text('task = "translate"\n')
    for path in stale + kept:
        backdate(path, 2 * 3600)
    (workspace.inbox / "old-dir.tmp").mkdir()  # not a file a producer wrote: left alone
    backdate(workspace.inbox / "old-dir.tmp", 2 * 3600)

    process = daemon.start()
    workspace.wait_for(lambda: not any(path.exists() for path in stale), timeout=60, what="stale temp files reaped")
    workspace.drop("after.toml", TRANSLATE)  # the daemon carries on
    workspace.wait_for_delivery("after")
    assert process.stop() == 0

    assert all(path.exists() for path in kept + [fresh])
    assert (workspace.inbox / "old-dir.tmp").is_dir()
    assert all(path.name in process.output() for path in stale), "each removal is logged"
    assert set(workspace.delivered()) == {"after"}, "no temp file was ever taken as a manifest"


#: Manifests (and an input file) that once raised out of intake, exited 1 and stayed in the inbox, so
#: that under Restart=on-failure nothing else was ever processed; each must be rejected, naming why.
HOSTILE = {
    "deep.toml": ('task = "sentiment"\ntexts = ["a"]\nx = ' + "[" * 10_000 + "]" * 10_000 + "\n", "nested too deeply"),
    "deep.json": ('{"task": "sentiment", "texts": ["a"], "x": ' + "[" * 10_000 + "]" * 10_000 + "}",
                  "nested too deeply"),
    "bigint.toml": ('task = "sentiment"\ntexts = ["a"]\nx = ' + "9" * 5_000 + "\n", "digits"),
    "bigint.json": ('{"task": "sentiment", "texts": ["a"], "x": ' + "9" * 5_000 + "}", "digits"),
    "nul.toml": ('task = "sentiment"\ninput = "a\\u0000.csv"\n', "NUL"),
    "long.toml": ('task = "sentiment"\ninput = "' + "a" * 300 + '.csv"\n', "cannot be looked up"),
    "tilde.toml": ('task = "sentiment"\ninput = "~nosuchuser/x.csv"\n', "not found"),
    "surrogate.json": ('{"task": "sentiment", "items": [{"id": "\\ud800", "text": "x"}]}', "items[0].id"),
    "surrogate-text.json": ('{"task": "sentiment", "texts": ["fine", "\\ud800"]}', "texts[1]: text that is not valid"),
    "surrogate-line.toml": ('task = "sentiment"\ninput = "surrogate.jsonl"\n', "line 2: text: text that is not valid"),
    "twice.json": ('{"task": "sentiment", "task": "translate", "texts": ["a"]}', "given twice"),
    "nan.toml": ('task = "sentiment"\ntexts = ["a"]\ntemperature = nan\n', "temperature: nan is not a number"),
    "nan.json": ('{"task": "sentiment", "texts": ["a"], "temperature": NaN}', "temperature: nan is not a number"),
    "deepline.toml": ('task = "sentiment"\ninput = "deep.jsonl"\n', "line 1"),
    # Amplification: what is small on disk but large in memory or in the error is refused before it is built.
    "huge-task.toml": ('task = "' + "x" * 4_000_000 + '"\ntexts = ["a"]\n', "characters in all"),
    "oversize.toml": ('task = "sentiment"\ntexts = ["' + "a" * 10_000_000 + '"]\n', "larger than 4,194,304 bytes"),
    "inline.json": ('{"task": "sentiment", "texts": [' + ",".join(["{}"] * 1_300_000) + "]}", "[limits] values"),
    "wide.toml": ('task = "sentiment"\ninput = "wide.csv"\n', "1,000,000 columns, more than 10,000"),
    "wide-row.toml": ('task = "sentiment"\ninput = "wide-row.csv"\n', "line 2: 5,000,002 values in one row"),
    "wide-line.toml": ('task = "sentiment"\ninput = "wide-line.jsonl"\n', "line 1: about 10,000,007 values"),
}
#: Input files of the manifests above.
HOSTILE_INPUTS = {
    "deep.jsonl": '{"id": "1", "text": ' + "[" * 10_000 + "]" * 10_000 + "}\n",
    "surrogate.jsonl": '{"id": "1", "text": "fine"}\n{"id": "2", "text": "\\udfff"}\n',
    "wide.csv": ",".join(f"c{n}" for n in range(1_000_000)) + "\n1,a\n",
    "wide-row.csv": "id,text\n1," + "ab," * 5_000_000 + "\n",
    "wide-line.jsonl": '{"id": "1", "text": "a", "x": [' + ",".join(["{}"] * 5_000_000) + "]}\n",
}


def test_manifests_that_once_crashed_intake_are_rejected_naming_why_and_the_others_still_run(workspace: Workspace):
    """Each once raised out of intake (a crash loop under Restart=on-failure) or was amplified: a 4 MB
    task made a summary.json and a journal row twice its size, a CSV header of a million columns a 21.8 MB
    error, a few MB of inline items or of one input line hundreds of MB of memory. Each is rejected naming
    file, field and line, its error capped, and batchd's memory stays that of an idle daemon."""
    for name, text in HOSTILE_INPUTS.items():
        (workspace.inbox / name).write_text(text)
    for name, (text, _) in HOSTILE.items():
        workspace.drop(name, text)
    workspace.drop("good.toml", TRANSLATE)

    result, peak_mb = run_measured(workspace, "run", "--once")

    assert result.returncode == 1, result.stderr[-3000:]  # rejected jobs, and no crash
    assert "Traceback" not in result.stderr
    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    for name, (_, reason) in HOSTILE.items():
        summary = delivered[Path(name).stem]
        assert summary["state"] == "rejected", name
        assert reason in summary["error"]["message"], (name, summary["error"])
        assert len(summary["error"]["message"]) <= 2_000 + 40, name  # [limits] error_chars, the length said
        assert (workspace.outbox / Path(name).stem / "summary.json").stat().st_size < 8_000, name
    assert sorted(p.name for p in workspace.inbox.iterdir() if p.suffix in (".toml", ".json")) == []
    assert peak_mb < 300, f"batchd (or its emulator) took {peak_mb:.0f} MB"
    journal = sqlite3.connect(workspace.state / "journal.db")
    try:
        largest_row = journal.execute("SELECT max(length(error)) FROM jobs").fetchone()[0]
    finally:
        journal.close()
    assert largest_row < 8_000


def run_measured(workspace: Workspace, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``batchd ARGS`` run to completion, and the peak resident memory in MB of the largest process it
    ran (batchd, or its embedded emulator): measured by a parent of their own, which waits for nothing else."""
    measure = ("import resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:]).returncode\n"
               "print(f'peak-rss-kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
               "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", measure, workspace.python, "-m", "batchd", *args],
                            cwd=workspace.root, env=workspace.env(), capture_output=True, text=True, timeout=240)
    peak_kb = int(result.stderr.rsplit("peak-rss-kb=", 1)[1].split()[0])
    return result, peak_kb / 1024


FAULTY_READER = '''
from pydantic import BaseModel, ConfigDict

from batchd import hookimpl
from batchd.task import Task, TaskRequest


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class Faulty(Task):
    """Its manifest check raises what no reader expects (a plugin's bug)."""

    name = "faulty"
    Params = Params

    def inline_items(self, params):
        raise KeyError("a bug in the plugin")

    def requests(self, params, items):
        yield from ()

    def organize(self, results):
        yield from ()


@hookimpl
def register_tasks(register):
    register(Faulty())
'''


def test_an_unexpected_error_reading_a_manifest_rejects_it_once_and_the_daemon_goes_on(workspace: Workspace):
    workspace.add_plugin("faulty", FAULTY_READER)
    workspace.configure(incomplete_grace_seconds=0)
    workspace.drop("faulty.toml", 'task = "faulty"\ntexts = ["a"]\n')
    workspace.drop("good.toml", TRANSLATE)

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr
    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    assert delivered["faulty"]["state"] == "rejected"
    assert "KeyError" in delivered["faulty"]["error"]["message"]
    assert result.stderr.count("reading the manifest failed unexpectedly") == 1  # logged once, with its traceback


def test_a_hard_link_into_the_inbox_is_rejected_and_moved_whole_never_copied(workspace: Workspace, tmp_path):
    """A hard link names a file its dropper may not be able to read: batchd neither runs it nor copies its
    bytes into a new file of its own; the entry itself goes to the rejected folder, as a symlink would."""
    outside = tmp_path / "not-theirs.toml"
    outside.write_text(TRANSLATE)
    (workspace.inbox / "linked.toml").hardlink_to(outside)

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr
    rejected = workspace.delivered()["linked"]
    assert rejected["state"] == "rejected" and rejected["error"]["kind"] == "hard link"
    assert "hard links" in rejected["error"]["message"]
    kept = workspace.outbox / "linked" / "linked.toml"
    assert os.stat(kept).st_ino == os.stat(outside).st_ino, "moved whole, not copied"
    assert remote_jobs(workspace) == []


def test_a_manifest_swapped_for_a_symlink_after_it_was_read_is_not_run(workspace: Workspace, tmp_path, monkeypatch):
    """The race of an attacker at the worst instant: the file is checked and read, then its name is
    pointed outside the inbox before the claim moves it. What was read is not what was moved, so the
    job is rejected, and nothing outside the inbox is read or sent."""
    from batchd.daemon import intake

    outside = tmp_path / "outside.toml"
    outside.write_text(TRANSLATE.replace("Hello", "A secret"))
    workspace.configure(settle_seconds=0)
    workspace.drop("swapped.toml", TRANSLATE)
    read_entry = intake.read_entry

    def read_then_swap(path, limit):
        entry = read_entry(path, limit)
        os.replace(_symlink_beside(path, outside), path)
        return entry

    monkeypatch.setattr(intake, "read_entry", read_then_swap)
    run_once_in_process(workspace)

    rejected = workspace.delivered()["swapped"]
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "replaced_while_claimed"
    assert os.path.islink(workspace.outbox / "swapped" / "swapped.toml"), "the symlink is kept, not followed"
    assert remote_jobs(workspace) == []


def test_a_manifest_swapped_for_a_symlink_between_the_scan_and_the_open_is_never_read(workspace: Workspace,
                                                                                     tmp_path, monkeypatch):
    """The scan saw a regular file; before intake opens it, the name points at a manifest elsewhere that
    names an input file beside it (such a manifest, read through the link, was run and its input sent;
    one with ``input =`` crashed the daemon). The open refuses the symlink: neither file is read."""
    from batchd.daemon import intake

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.toml").write_text('task = "sentiment"\ninput = "rows.csv"\n')
    (elsewhere / "rows.csv").write_text("id,text\n1,a secret row\n")
    workspace.configure(settle_seconds=0)
    workspace.drop("swapped.toml", 'task = "sentiment"\ninput = "rows.csv"\n')
    (workspace.inbox / "rows.csv").write_text("id,text\n1,an ordinary row\n")
    workspace.drop("good.toml", TRANSLATE)
    read_entry, opened = intake.read_entry, []

    def swap_then_read(path, limit):
        if path.name == "swapped.toml":
            os.replace(_symlink_beside(path, elsewhere / "secret.toml"), path)
        opened.append(path.name)
        return read_entry(path, limit)

    monkeypatch.setattr(intake, "read_entry", swap_then_read)
    run_once_in_process(workspace)

    assert "swapped.toml" in opened
    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    rejected = delivered["swapped"]
    assert rejected["state"] == "rejected" and rejected["error"]["kind"] == "symlink", rejected
    assert os.path.islink(workspace.outbox / "swapped" / "swapped.toml"), "the symlink is kept, not followed"
    assert len(remote_jobs(workspace)) == 1, "only the good manifest reached the service"
    assert (elsewhere / "rows.csv").read_text() == "id,text\n1,a secret row\n"
    assert (workspace.inbox / "rows.csv").exists(), "the input of the manifest never run stays"


def test_an_input_folder_swapped_for_a_symlink_after_the_check_is_not_followed(workspace: Workspace, tmp_path,
                                                                               monkeypatch):
    """The manifest and its input (in a folder of the inbox) are checked; then the folder is swapped for a
    symlink to a look-alike elsewhere before the input is taken. The input is reached from the inbox one
    folder at a time without following a symlink, so the job is rejected and the other file never read."""
    from batchd.daemon import intake

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rows.csv").write_text("id,text\n1,a secret row\n")
    data = workspace.inbox / "data"
    data.mkdir()
    (data / "rows.csv").write_text("id,text\n1,an ordinary row\n")
    workspace.configure(settle_seconds=0)
    workspace.drop("reads.toml", 'task = "sentiment"\ninput = "data/rows.csv"\n')
    load_manifest = intake.load_manifest

    def load_then_swap(*args, **kwargs):
        manifest = load_manifest(*args, **kwargs)
        os.rename(data, workspace.inbox / ".data-moved")
        data.symlink_to(elsewhere)
        return manifest

    monkeypatch.setattr(intake, "load_manifest", load_then_swap)
    run_once_in_process(workspace)

    rejected = workspace.delivered()["reads"]
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "unsafe_input", rejected
    assert "reached through 'data'" in rejected["error"]["message"]
    assert remote_jobs(workspace) == []


@pytest.mark.parametrize("change", ["removed", "folder", "fifo"])
def test_an_input_removed_or_replaced_after_the_check_rejects_its_job_not_the_daemon(workspace: Workspace,
                                                                                    monkeypatch, change: str):
    """The manifest is checked with its input there; then the input is removed, or replaced by a folder or
    a FIFO, before the claim takes it (a producer cleaning up, or someone racing it). The job is rejected
    saying so, and the daemon goes on with the others."""
    from batchd.daemon import intake

    workspace.configure(settle_seconds=0)
    (workspace.inbox / "rows.csv").write_text("id,text\n1,Fine.\n")
    workspace.drop("reads.toml", 'task = "sentiment"\ninput = "rows.csv"\n')
    workspace.drop("good.toml", TRANSLATE)
    load_manifest = intake.load_manifest

    def load_then_change(path, *args, **kwargs):
        manifest = load_manifest(path, *args, **kwargs)
        if path.name == "reads.toml":
            (workspace.inbox / "rows.csv").unlink()
            if change == "folder":
                (workspace.inbox / "rows.csv").mkdir()
            elif change == "fifo":
                os.mkfifo(workspace.inbox / "rows.csv")
        return manifest

    monkeypatch.setattr(intake, "load_manifest", load_then_change)
    run_once_in_process(workspace)

    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    rejected = delivered["reads"]
    assert rejected["state"] == "rejected", rejected
    expected = {"removed": "No such file or directory", "folder": "directory", "fifo": "fifo"}[change]
    assert "rows.csv" in rejected["error"]["message"] and expected in rejected["error"]["message"], rejected
    assert len(remote_jobs(workspace)) == 1, "only the good manifest reached the service"


def run_once_in_process(workspace: Workspace) -> None:
    """``batchd run --once`` in this process, so that a test can patch a step's module to race it."""
    from batchd.config import load_settings
    from batchd.daemon import Daemon

    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    try:
        daemon.loop.run()
    finally:
        daemon.close()


def _symlink_beside(path: Path, target: Path) -> Path:
    link = path.with_name(".swap-" + path.name)
    link.symlink_to(target)
    return link


def test_an_input_file_that_is_a_hard_link_is_never_read(workspace: Workspace, tmp_path):
    outside = tmp_path / "rows.csv"
    outside.write_text("id,text\n1,a secret row\n")
    (workspace.inbox / "rows.csv").hardlink_to(outside)
    workspace.drop("reads.toml", 'task = "sentiment"\ninput = "rows.csv"\n')

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr
    rejected = workspace.delivered()["reads"]
    assert rejected["state"] == "rejected" and rejected["error"]["code"] == "unsafe_input"
    assert "hard link" in rejected["error"]["message"]
    assert remote_jobs(workspace) == []


def test_an_inbox_deleted_while_batchd_runs_is_created_again_and_served(workspace: Workspace, daemon: DaemonRunner):
    import shutil

    workspace.configure(settle_seconds=0, rescan_seconds=0.5)
    process = daemon.start()
    workspace.drop("before.toml", TRANSLATE)
    workspace.wait_for_delivery("before")

    shutil.rmtree(workspace.inbox)
    workspace.wait_for(workspace.inbox.is_dir, timeout=30, what="the inbox created again")
    workspace.drop("after.toml", TRANSLATE.replace("Hello", "Hi again"))
    workspace.wait_for_delivery("after")

    assert process.stop() == 0, process.output()[-3000:]
    assert "created it again" in process.output()
    assert "Traceback" not in process.output()


def test_an_outbox_deleted_while_batchd_runs_is_created_again_and_published_into(workspace: Workspace,
                                                                               daemon: DaemonRunner):
    """An operator (or a cleanup job) removes the whole outbox while batchd runs: the next job's publish
    found no outbox and crashed the daemon (FileNotFoundError). It is created again, as the inbox is, and
    the job is published into it; a file put in its place holds the publishes, said once, until it is a
    folder again."""
    import shutil

    workspace.configure(settle_seconds=0, rescan_seconds=0.5)
    process = daemon.start()
    workspace.drop("before.toml", TRANSLATE)
    workspace.wait_for_delivery("before")

    shutil.rmtree(workspace.outbox)
    workspace.drop("after.toml", TRANSLATE.replace("Hello", "Hi again"))
    workspace.wait_for_delivery("after")
    assert process.poll() is None, process.output()[-3000:]

    shutil.rmtree(workspace.outbox)
    workspace.outbox.write_text("not a folder")
    workspace.drop("held.toml", TRANSLATE.replace("Hello", "Held"))
    workspace.wait_for(lambda: "cannot be created again" in process.output(), timeout=60, what="the error said")
    workspace.outbox.unlink()
    workspace.wait_for_delivery("held")

    assert process.stop() == 0, process.output()[-3000:]
    assert process.output().count("the outbox") >= 2 and "created it again" in process.output()
    assert process.output().count("cannot be created again") == 1
    assert "Traceback" not in process.output()
    assert {folder.state for folder in workspace.outbox_folders().values()} == {"succeeded"}


def test_upper_case_suffixes_are_manifests_to_run_once_and_to_reject_alike(workspace: Workspace):
    """`run --once` waits for UP.TOML as `run` takes it; a folder named X.TOML is rejected, not left forever."""
    workspace.drop("UP.TOML", TRANSLATE)
    (workspace.inbox / "FOLDER.JSON").mkdir()

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 1, result.stderr  # the folder is rejected
    delivered = workspace.delivered()
    assert delivered["UP"]["state"] == "succeeded"
    assert delivered["FOLDER"]["state"] == "rejected" and delivered["FOLDER"]["error"]["kind"] == "directory"
    assert os.listdir(workspace.inbox) == []


def test_folders_and_fifos_named_like_manifests_being_written_are_never_read_as_one(workspace: Workspace,
                                                                                    tmp_path):
    """Whether an input file goes with its job depends on what the other manifests waiting in the inbox
    name, those still being written (``x.toml.part``) too: their first bytes are read. A folder of such
    a name, which intake otherwise leaves alone, made that read raise (IsADirectoryError, found by
    bench/fuzz.py) and stopped the daemon at every claim of a manifest with an input; a FIFO must not
    block it, and a hard link's bytes, which may be anyone's, are not read either."""
    outside = tmp_path / "not-theirs.toml"
    outside.write_text('task = "sentiment"\ninput = "rows.csv"\n')
    (workspace.inbox / "folder.toml.d").mkdir()
    os.mkfifo(workspace.inbox / "pipe.json.part")
    os.link(outside, workspace.inbox / "linked.toml.old")
    (workspace.inbox / "rows.csv").write_text("id,text\n1,Fine.\n")
    workspace.drop("reads.toml", 'task = "sentiment"\ninput = "rows.csv"\n')

    result = workspace.batchd("run", "--once", timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert workspace.delivered()["reads"]["state"] == "succeeded"
    assert (workspace.outbox / "reads" / "rows.csv").exists(), "no other manifest named it: it went with its job"
    assert sorted(os.listdir(workspace.inbox)) == ["folder.toml.d", "linked.toml.old", "pipe.json.part"]


def test_a_manifest_changed_after_it_was_checked_does_not_run(workspace: Workspace):
    """A producer that kept the file open for writing can change it after batchd checked and claimed it:
    the build reads the claimed file again, finds other bytes than those checked, and rejects the job
    instead of running what was never validated."""
    from batchd.config import load_settings
    from batchd.daemon import Daemon

    workspace.configure(settle_seconds=0)
    workspace.drop("changing.toml", TRANSLATE)
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    try:
        with daemon.journal.group():
            daemon.steps.intake.take()  # claimed, not yet built: the bytes checked are on record
        (job,) = daemon.journal.active_jobs()
        claimed = daemon.steps.build.ctx.spool(job.id).manifest_path(job.source)
        with open(claimed, "r+") as still_open:  # the producer's descriptor, from before the claim
            still_open.write(TRANSLATE.replace("Hello", "Other"))
        daemon.loop.run()
    finally:
        daemon.close()

    rejected = workspace.delivered()["changing"]
    assert rejected["state"] == "rejected"
    assert "changed after batchd checked it" in rejected["error"]["message"]
    assert len(daemon.steps.build.ctx.claimed_manifests) == 0, "the claim's parse of other bytes is dropped"
    assert remote_jobs(workspace) == []


def test_the_build_takes_the_claims_parse_of_a_small_manifest_and_reads_its_bytes_again(workspace: Workspace):
    """A claim keeps what it parsed and checked of a manifest that names no input file; the build still
    reads the claimed file and compares its bytes (the test above), then takes that parse instead of
    parsing again. A manifest with an input file is parsed again from the spool (its inputs are the
    spool's copies there)."""
    from batchd.config import load_settings
    from batchd.daemon import Daemon

    workspace.configure(settle_seconds=0)
    workspace.drop("inline.toml", TRANSLATE)
    workspace.drop("cancelled.toml", TRANSLATE.replace("Hello", "Bye"))
    (workspace.inbox / "rows.csv").write_text("id,text\n1,Fine.\n")
    workspace.drop("reads.toml", 'task = "sentiment"\ninput = "rows.csv"\n')
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    try:
        with daemon.journal.group():
            daemon.steps.intake.take()
        claimed = daemon.steps.build.ctx.claimed_manifests
        assert len(claimed) == 2, "only the manifests without an input file are kept"
        (dropped,) = [job for job in daemon.journal.active_jobs() if job.name == "cancelled"]
        with daemon.journal.group():
            daemon.journal.update_job(dropped.id, cancel_requested=1)
        daemon.loop.run()
        assert len(claimed) == 0, "the build took one, the cancel forgot the other"
    finally:
        daemon.close()

    delivered = workspace.delivered()
    assert delivered["inline"]["state"] == "succeeded" and delivered["reads"]["state"] == "succeeded"
    assert delivered["cancelled"]["state"] == "cancelled"


def test_a_claimed_manifest_is_taken_once_for_its_hash_and_bounded():
    from batchd.daemon.context import ClaimedManifests
    from batchd.manifest import load_manifest

    manifest = load_manifest(Path("small.toml"), content=TRANSLATE.encode(), check_inputs=False)
    claimed = ClaimedManifests(memory=2 * (4 * 100 + 2560), largest=100)
    claimed.keep("job", "sha", manifest, 100)
    taken = claimed.take("job", "sha", Path("spool/small.toml"))
    assert taken is not None and taken.path == Path("spool/small.toml") and taken.task == "translate"
    assert claimed.take("job", "sha", Path("spool/small.toml")) is None, "a second reader parses anew"
    claimed.keep("job", "sha", manifest, 100)
    assert claimed.take("job", "0" * 64, Path("x")) is None, "kept only for the bytes the claim hashed"
    claimed.keep("big", "sha", manifest, 101)
    assert claimed.take("big", "sha", Path("x")) is None, "a large manifest is never kept"
    for n in range(5):
        claimed.keep(f"job-{n}", "sha", manifest, 100)
    assert len(claimed) == 2, "full: the first claimed (the first built) are kept, later ones are not"
    assert claimed.take("job-2", "sha", Path("x")) is None and claimed.take("job-0", "sha", Path("x")) is not None
    claimed.keep("job-5", "sha", manifest, 100)
    assert claimed.take("job-5", "sha", Path("x")) is not None, "what was taken no longer counts"
    claimed.keep("job-6", "sha", manifest, 100)
    claimed.forget("job-1")
    claimed.forget("job-6")
    claimed.keep("job-7", "sha", manifest, 100)
    claimed.keep("job-8", "sha", manifest, 100)
    assert len(claimed) == 2, "nor what was forgotten"


def test_a_flood_of_control_files_is_taken_over_several_ticks(workspace: Workspace):
    """Control files count against a tick's claims, as manifests do: thousands of NAME.cancel files dropped at
    once are taken over many ticks, so one tick never holds up the loop for all of them. (NAME.approve: the
    cancels dropped while batchd was down are all taken at its start, before it reconciles.)"""
    from batchd.config import load_settings
    from batchd.daemon import Daemon
    from batchd.daemon.intake import CLAIMS_PER_TICK

    workspace.configure(settle_seconds=0)
    for n in range(CLAIMS_PER_TICK + 10):
        workspace.drop(f"nobody-{n:03d}.approve", "")
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    try:
        with daemon.journal.group():
            daemon.steps.intake.take()
        assert daemon.steps.intake.backlog
        assert len(list(workspace.inbox.glob("*.approve"))) == 10, "one tick took them all"
        with daemon.journal.group():
            daemon.steps.intake.take()
        assert not list(workspace.inbox.glob("*.approve"))
    finally:
        daemon.close()


def test_the_limits_come_from_the_config_and_cut_the_error(workspace: Workspace):
    workspace.configure(limits={"list_items": 2, "error_chars": 100})
    workspace.drop("two.toml", 'task = "sentiment"\ntexts = ["Fine.", "Bad."]\n')
    workspace.drop("three.toml", 'task = "sentiment"\ntexts = ["a", "b", "c"]\n')
    workspace.drop("unknown.toml", 'task = "sentiment"\ntexts = ["a"]\nx = 1\n')

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1, result.stderr  # jobs were rejected
    delivered = workspace.delivered()
    assert delivered["two"]["state"] == "succeeded"
    assert delivered["three"]["state"] == "rejected"
    assert "texts: 3 entries, more than 2" in delivered["three"]["error"]["message"]
    error = delivered["unknown"]["error"]
    assert error["field"] == "x" and error["reason"].startswith("unknown field (task 'sentiment' takes")
    assert len(error["reason"]) < 150 and error["reason"].endswith("characters in all)")


def test_a_job_id_already_taken_is_drawn_again_never_reused(workspace: Workspace, monkeypatch):
    """Ids are the second plus 24 random bits: a burst claiming thousands a second draws one already
    taken now and then (by a job of the journal, or a spool folder a crash left): it is drawn again."""
    from batchd.config import load_settings
    from batchd.daemon import Daemon, intake

    workspace.configure(settle_seconds=0)
    drawn = iter(["20260101000000-aaaaaa", "20260101000000-bbbbbb", "20260101000000-bbbbbb",
                  "20260101000000-aaaaaa", "20260101000000-cccccc"])
    monkeypatch.setattr(intake, "new_job_id", lambda: next(drawn))
    workspace.drop("one.toml", TRANSLATE)
    workspace.drop("two.toml", TRANSLATE.replace("Hello", "Good morning"))
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    try:
        (daemon.settings.state_dir / "jobs" / "20260101000000-aaaaaa").mkdir(parents=True)  # a spool left over
        daemon.loop.tick()
        ids = sorted(job.id for job in daemon.journal.jobs())
    finally:
        daemon.close()
    assert ids == ["20260101000000-bbbbbb", "20260101000000-cccccc"]


def _as_nobody() -> list[str] | None:
    """A command prefix that runs what follows as the user nobody: only when the tests run as root and nobody
    may run this interpreter (a Python under /root usually is not)."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # (as batchd will: import it, and start a child interpreter as the embedded emulator is started)
    probe = subprocess.run([*prefix, sys.executable, "-c", "import subprocess, sys, batchd; "
                            "subprocess.run([sys.executable, '-c', ''], check=True)"], capture_output=True, cwd="/")
    return prefix if probe.returncode == 0 else None


def _nobody_workspace():
    """A workspace in a folder of its own that the user nobody owns, and the prefix that runs as nobody."""
    import tempfile

    prefix = _as_nobody()
    if prefix is None:
        why = "needs root (to drop privileges to nobody) and an interpreter nobody may run"
        if os.environ.get("BATCHD_REQUIRE_NOBODY"):  # CI (.ci/run) makes it possible
            pytest.fail(why)
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="batchd-nobody-"))
    root.chmod(0o755)
    return Workspace.create(root), prefix


def _run_as_nobody(workspace: Workspace, prefix: list[str]) -> tuple[subprocess.Popen, Path]:
    """``batchd run`` as nobody, once ready: the process and its log."""
    log = workspace.root / "daemon.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*prefix, workspace.python, "-m", "batchd", "run"], cwd=workspace.root,
                                   env=workspace.env(), stdout=out, stderr=subprocess.STDOUT)
    workspace.wait_for(lambda: "batchd ready" in log.read_text(), what="the daemon ready")
    return process, log


def _stopped(process: subprocess.Popen, log: Path) -> str:
    """SIGTERM, a clean exit, and what the daemon said (no traceback)."""
    process.terminate()
    assert process.wait(30) == 0
    said = log.read_text()
    assert "Traceback" not in said, said[-3000:]
    return said


def _own_by_nobody(root: Path) -> None:
    for path in (root, *root.rglob("*")):
        os.chown(path, 65534, 65534, follow_symlinks=False)


_CLAIM_REFUSED_FOR_NOW = """
import json, logging, os, sys
from pathlib import Path
from batchd.config import load_settings
from batchd.daemon import Daemon

logging.basicConfig(level=logging.INFO)
root = Path(sys.argv[1])
daemon = Daemon(load_settings(root / "config.toml"))
daemon.start()
try:
    journal, intake, inbox = daemon.journal, daemon.steps.intake, root / "inbox"
    (inbox / "late.toml").write_text(sys.argv[2])
    # A claim intended (its row committed) when the operator's chmod lands, before the move.
    journal.add_job("j1", name="late", source="late.toml")
    daemon.ctx.spool("j1").root.mkdir(parents=True)
    os.chmod(inbox, 0o555)
    refused = intake.finish_claim(journal.job("j1"))
    during = (journal.job("j1").state, journal.job("j1").error, (inbox / "late.toml").exists(),
              (inbox / "late.toml").stat().st_nlink)
    os.chmod(inbox, 0o755)
    with journal.group():
        intake.take()  # the inbox may be written again: the claim is finished first
    after = (journal.job("j1").state, journal.job("j1").error, (inbox / "late.toml").exists())
    print(json.dumps({"refused": refused, "during": during, "after": after}))
finally:
    daemon.close()
"""


def test_a_claim_the_inbox_refuses_for_a_moment_waits_and_is_finished_not_rejected():
    """The inbox made unwritable for batchd's user between a tick's look at it and a claim's move (an
    operator's chmod): the claim stays intended, the file where it was, and is finished once the inbox may be
    written again. Before, the move's EACCES was taken for another user's file in a sticky folder: the job
    rejected for good as not movable, and the manifest claimed again as a second job after a restart."""
    import json
    import shutil

    workspace, prefix = _nobody_workspace()
    try:
        _own_by_nobody(workspace.root)
        script = workspace.root / "refused.py"
        script.write_text(_CLAIM_REFUSED_FOR_NOW)
        run = subprocess.run([*prefix, workspace.python, str(script), str(workspace.root), TRANSLATE],
                             cwd=workspace.root, env=workspace.env(), capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen["refused"] is False
        assert seen["during"] == ["claiming", None, True, 1]  # left as it was: no spool name, no verdict
        assert seen["after"] == ["received", None, False]
        assert "its claim is finished once batchd's user may move files out of the inbox again" in run.stderr
    finally:
        shutil.rmtree(workspace.root, ignore_errors=True)


def test_an_outbox_batchd_may_not_write_stops_the_start_and_holds_publishes_while_it_runs():
    """The outbox not writable by batchd's user: at a start, one line and exit 74 (as for the state dir), not
    a start that fails at the first publish; made so while batchd runs (an operator's chown), the finished
    job waits, said once, and is published once batchd may write there again. Before, the publish raised
    PermissionError out of the loop: a dead daemon."""
    import shutil

    workspace, prefix = _nobody_workspace()
    try:
        _own_by_nobody(workspace.root)
        os.chown(workspace.outbox, 0, 0)
        refused = subprocess.run([*prefix, workspace.python, "-m", "batchd", "run", "--once"], cwd=workspace.root,
                                 env=workspace.env(), capture_output=True, text=True, timeout=120)
        assert refused.returncode == 74, refused.stderr[-3000:]
        assert f"writing {workspace.outbox} failed (EACCES" in refused.stderr and "Traceback" not in refused.stderr

        os.chown(workspace.outbox, 65534, 65534)
        process, log = _run_as_nobody(workspace, prefix)
        try:
            os.chown(workspace.outbox, 0, 0)
            workspace.drop("translate.toml", TRANSLATE)
            os.chown(workspace.inbox / "translate.toml", 65534, 65534)
            workspace.wait_for(lambda: "may not write into the outbox" in log.read_text(), what="the wait said")
            assert process.poll() is None and not workspace.outbox_folders()
            os.chown(workspace.outbox, 65534, 65534)
            workspace.wait_for(lambda: "translate" in workspace.outbox_folders(), timeout=60, what="the job published")
        finally:
            said = _stopped(process, log)
        assert said.count("may not write into the outbox") == 1
        assert "may write into the outbox" in said.split("may not write into the outbox")[1]  # (again)
    finally:
        shutil.rmtree(workspace.root, ignore_errors=True)


def test_a_manifest_batchd_may_not_read_is_rejected_and_moved_whole_and_the_others_run():
    """Another user drops a manifest batchd's user may not read (mode 000) into a shared inbox: it is rejected,
    saying so, and moved into its folder whole, unread; the other manifests are delivered. Before, its folder's
    copy of the manifest raised PermissionError out of the loop: the daemon died, and after a restart died
    again on the same job, the others never delivered."""
    import shutil

    workspace, prefix = _nobody_workspace()
    root = workspace.root
    try:
        workspace.drop("translate.toml", TRANSLATE)
        secret = workspace.drop("secret.toml", TRANSLATE.replace("Hello", "Private"))
        _own_by_nobody(root)
        os.chown(secret, 0, 0)
        secret.chmod(0)

        run = subprocess.run([*prefix, workspace.python, "-m", "batchd", "run", "--once"], cwd=root,
                             env=workspace.env(), capture_output=True, text=True, timeout=120)

        assert run.returncode == 1, run.stderr[-3000:]  # a job was rejected
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        delivered = workspace.delivered()
        assert delivered["translate"]["state"] == "succeeded"
        assert delivered["secret"]["state"] == "rejected"
        assert "Permission denied" in delivered["secret"]["error"]["message"]
        moved = workspace.outbox / "secret" / "secret.toml"
        assert moved.stat().st_uid == 0 and moved.stat().st_mode & 0o777 == 0  # the dropped file itself
        assert not list(workspace.inbox.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_inbox_batchd_may_not_take_from_holds_claims_and_another_users_file_in_a_sticky_one_is_left():
    """The inbox made so batchd's user may not move files out of it while batchd runs: claims wait, said once,
    and go on once it may. A shared drop folder (mode 1777, another owner) where another user dropped a file:
    only its owner may move it, so its job is rejected saying so, the file left in place and not taken again
    at each rescan nor after a restart, while batchd's own drops are delivered; another user's stale temp file is
    left too. Before, each raised PermissionError out of the loop: a dead daemon, again at every restart."""
    import shutil

    workspace, prefix = _nobody_workspace()
    try:
        workspace.configure(rescan_seconds=0.3)
        _own_by_nobody(workspace.root)
        process, log = _run_as_nobody(workspace, prefix)
        try:
            os.chown(workspace.inbox, 0, 0)  # (mode 755: root's alone)
            os.chown(workspace.drop("first.toml", TRANSLATE), 65534, 65534)
            workspace.wait_for(lambda: "may not move files out of the inbox" in log.read_text(), what="the wait said")
            time.sleep(1)
            assert process.poll() is None and (workspace.inbox / "first.toml").exists()

            stale = workspace.inbox / "upload.csv.part"  # another user's, left two days ago: not batchd's to remove
            stale.write_text("half a file")
            os.utime(stale, (time.time() - 2 * 86400,) * 2)
            workspace.inbox.chmod(0o1777)  # a shared drop folder, still root's
            workspace.wait_for(lambda: "first" in workspace.outbox_folders(), timeout=60, what="first delivered")
            foreign = workspace.drop("foreign.toml", TRANSLATE.replace("Hello", "Foreign"))  # root's file
            hidden = workspace.root / "hidden.toml"  # root's too, and batchd's user may not even read it
            hidden.write_text(TRANSLATE.replace("Hello", "Hidden"))
            hidden.chmod(0)
            hidden = hidden.rename(workspace.inbox / "hidden.toml")
            shared = workspace.root / "shared.toml"  # root's, that anyone may write: the kernel lets nobody link it
            shared.write_text(TRANSLATE.replace("Hello", "Shared"))
            shared.chmod(0o666)
            shared = shared.rename(workspace.inbox / "shared.toml")
            workspace.wait_for(lambda: {"foreign", "hidden", "shared"} <= set(workspace.outbox_folders()), timeout=60,
                               what="foreign, hidden and shared rejected")
            request = workspace.inbox / "ghost.cancel"  # another user's `batchd cancel`: acted on, left
            request.write_bytes(b"")
            workspace.wait_for(lambda: "ghost.cancel was acted on" in log.read_text(), what="the cancel taken")
            time.sleep(1.5)  # rescans meanwhile
            assert process.poll() is None and request.exists()
        finally:
            said = _stopped(process, log)
        assert said.count("may not move files out of the inbox") == 1
        assert "may move files out of the inbox" in said.split("may not move files out of")[1]  # (again)
        for name in ("foreign.toml", "hidden.toml", "shared.toml"):
            assert said.count(f"{name} cannot be moved out of the inbox by batchd's user (Operation not permitted); "
                              "rejected, and left there") == 1  # not taken again at the rescans
        assert said.count("ghost.cancel was acted on") == 1
        for name in ("foreign", "hidden", "shared"):
            summary = workspace.delivered()[name]
            assert summary["state"] == "rejected" and summary["error"]["code"] == "not_movable"
        assert foreign.exists() and hidden.exists() and stale.exists()
        # The one batchd's user could link into its spool before the move failed: its spool name went again,
        # as a failed move leaves none (no other name of another user's file, in the outbox or anywhere).
        assert shared.stat().st_nlink == 1 and not (workspace.outbox / "shared" / "shared.toml").exists()
        assert set(workspace.outbox_folders()) == {"first", "foreign", "hidden", "shared"}

        # A restart leaves them as the last run did: no second rejection (folder, event) for the same files, the
        # one batchd's user may read known by its bytes, the other by its last change. The cancel left in the
        # inbox was taken: a job of its name dropped since is not what it asked to cancel.
        os.chown(workspace.drop("ghost.toml", TRANSLATE.replace("Hello", "Ghost")), 65534, 65534)
        process, log = _run_as_nobody(workspace, prefix)
        try:
            workspace.wait_for(lambda: "ghost" in workspace.outbox_folders(), timeout=60, what="ghost delivered")
            time.sleep(1.5)  # rescans
        finally:
            said = _stopped(process, log)
        assert not [name for name in ("foreign", "hidden", "shared") if f"{name}.toml cannot be moved" in said], said[-3000:]
        assert foreign.exists() and hidden.exists() and request.exists()
        assert workspace.delivered()["ghost"]["state"] == "succeeded", "cancelled by the request taken before"
        assert "ghost.cancel" not in said
        assert set(workspace.outbox_folders()) == {"first", "foreign", "hidden", "shared", "ghost"}

        # Changed since (its owner wrote it again): a file the last rejection was not about, rejected anew.
        time.sleep(0.05)
        hidden.chmod(0o600)  # (a change of its mode is a change: its ctime moves)
        process, log = _run_as_nobody(workspace, prefix)
        try:
            workspace.wait_for(lambda: "hidden-2" in workspace.outbox_folders(), timeout=60, what="hidden rejected anew")
        finally:
            said = _stopped(process, log)
        assert said.count("hidden.toml cannot be moved out of the inbox by batchd's user (Operation not permitted); "
                          "rejected, and left there") == 1 and "foreign.toml cannot be moved" not in said
        assert "ghost.cancel" not in said
    finally:
        shutil.rmtree(workspace.root, ignore_errors=True)
