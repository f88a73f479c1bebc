"""Tests of batchd.outbox: atomic writes, no-overwrite moves, job folders, streamed JSON."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest

from batchd import outbox
from batchd.durable import (
    CrossDeviceError,
    atomic_write,
    atomic_write_json,
    check_same_filesystem,
    durable_move,
    link_first,
    numbered_paths,
    unlink_old,
    write_temp,
)
from batchd.outbox import JobFolder, JsonObjectWriter, choose_folder


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# -- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, "first")
    atomic_write(target, b"second \xc3\xa9")
    assert target.read_bytes() == b"second \xc3\xa9"
    assert names(tmp_path) == ["state.json"]


def test_atomic_write_str_is_utf8(tmp_path):
    atomic_write(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_bytes() == "héllo".encode()


def test_atomic_write_failure_keeps_old_content_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    def failing_replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outbox.os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert names(tmp_path) == ["state.json"]


def test_write_temp_is_a_hidden_sibling(tmp_path):
    source = io.BytesIO(b"streamed" * 1000)
    tmp = write_temp(tmp_path / "final.toml", source)
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".final.toml.") and tmp.name.endswith(".tmp")
    assert tmp.read_bytes() == b"streamed" * 1000
    assert not (tmp_path / "final.toml").exists()


def test_atomic_write_json_format(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"b": [1, 2], "a": "é"})
    text = (tmp_path / "x.json").read_text(encoding="utf-8")
    assert text == '{\n  "b": [\n    1,\n    2\n  ],\n  "a": "é"\n}\n'


def test_atomic_write_json_rejects_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")})
    assert names(tmp_path) == []


# -- moves --------------------------------------------------------------------------------------


def test_durable_move_file_across_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src = tmp_path / "a" / "job.toml"
    src.write_text("x")
    durable_move(src, tmp_path / "b" / "job.toml")
    assert not src.exists()
    assert (tmp_path / "b" / "job.toml").read_text() == "x"


def test_durable_move_never_overwrites_a_file(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("new")
    dst.write_text("precious")
    with pytest.raises(FileExistsError):
        durable_move(src, dst)
    assert src.read_text() == "new"
    assert dst.read_text() == "precious"


def test_durable_move_directory_never_replaces_an_empty_directory(tmp_path):
    # rename(2) would silently replace an empty directory.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("x")
    dst.mkdir()
    with pytest.raises(FileExistsError):
        durable_move(src, dst)
    assert (src / "f").exists()


def test_durable_move_completes_a_move_interrupted_between_link_and_unlink(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("x")
    os.link(src, dst)  # what a kill -9 right after the link leaves behind
    durable_move(src, dst)
    assert not src.exists()
    assert dst.read_text() == "x"


def test_durable_move_without_hard_links_still_refuses_to_overwrite(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outbox.os, "link", no_links)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("x")
    durable_move(src, dst)
    assert dst.read_text() == "x" and not src.exists()

    src.write_text("y")
    with pytest.raises(FileExistsError):
        durable_move(src, dst)
    assert dst.read_text() == "x"


def test_durable_move_moves_a_symlink_itself(tmp_path):
    target = tmp_path / "target"
    target.write_text("t")
    link = tmp_path / "link"
    link.symlink_to(target)
    (tmp_path / "q").mkdir()
    durable_move(link, tmp_path / "q" / "link")
    assert (tmp_path / "q" / "link").is_symlink()
    assert target.read_text() == "t"


def test_durable_move_reports_cross_device_clearly(tmp_path, monkeypatch):
    def exdev(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(outbox.os, "link", exdev)
    src = tmp_path / "src"
    src.write_text("x")
    with pytest.raises(CrossDeviceError, match="different filesystems"):
        durable_move(src, tmp_path / "dst")
    assert src.exists()


def test_a_move_in_two_halves_links_first_and_removes_the_old_name_only_if_it_is_still_the_file(tmp_path):
    """A tick's claims: every file linked into its spool, the new names synced together, then each old name
    removed; a file dropped in the old name's place meanwhile is a new file, and stays."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "spool").mkdir()
    moved, replaced, gone = (tmp_path / "inbox" / name for name in ("a.toml", "b.toml", "c.toml"))
    for path in (moved, replaced, gone):
        path.write_text(path.name)
    synced: list[Path] = []

    def sync(directory: Path, *, step: str | None = None) -> None:
        synced.append(directory)

    unclaimed = tmp_path / "inbox" / "d.toml"
    unclaimed.write_text(unclaimed.name)
    assert all(link_first(path, tmp_path / "spool" / path.name, step="claim")
               for path in (moved, replaced, gone, unclaimed))
    assert link_first(moved, tmp_path / "spool" / "a.toml")  # killed between the halves: linked already
    assert not link_first(tmp_path / "inbox" / "none.toml", tmp_path / "spool" / "none.toml")
    assert not link_first(tmp_path / "spool", tmp_path / "inbox" / "folder")  # a folder is renamed instead
    (tmp_path / "other").write_text("dropped again")
    os.replace(tmp_path / "other", replaced)
    gone.unlink()
    (tmp_path / "spool" / "d.toml").unlink()  # the new name removed between the halves: the old one stays
    assert not unlink_old(unclaimed, tmp_path / "spool" / "d.toml", step="claim", sync=sync)
    for path in (moved, replaced, gone):
        assert unlink_old(path, tmp_path / "spool" / path.name, step="claim", sync=sync)
    assert names(tmp_path / "inbox") == ["b.toml", "d.toml"] and replaced.read_text() == "dropped again"
    assert names(tmp_path / "spool") == ["a.toml", "b.toml", "c.toml"]
    assert (tmp_path / "spool" / "b.toml").read_text() == "b.toml"
    assert synced == [tmp_path / "inbox"]  # the one old name removed


def test_check_same_filesystem(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    check_same_filesystem(tmp_path / "a", tmp_path / "b")
    if os.stat("/proc").st_dev != os.stat(tmp_path).st_dev:
        with pytest.raises(CrossDeviceError, match="are on different filesystems") as info:
            check_same_filesystem(tmp_path, "/proc")
        assert info.value.errno == errno.EXDEV
        assert "/proc" in str(info.value)


# -- choosing and recognising folders ------------------------------------------------------------


def test_choose_folder_adds_a_suffix_when_taken(tmp_path):
    assert choose_folder(tmp_path, "report") == tmp_path / "report"
    (tmp_path / "report").mkdir()
    assert choose_folder(tmp_path, "report") == tmp_path / "report-2"
    (tmp_path / "report-2").mkdir()
    assert choose_folder(tmp_path, "report") == tmp_path / "report-3"


def test_choose_folder_finds_the_next_of_a_name_reused_thousands_of_times_in_a_few_lookups(tmp_path):
    """A producer drops report.toml every hour: report, report-2 … report-5000 exist. The next job's folder is
    report-5001, found in 2 log2(5000) lookups, not 5,000 (each delivery's cost grew with the name's history);
    with a hole someone made in the run, a free name is chosen all the same."""
    for number in range(1, 5001):
        (tmp_path / ("report" if number == 1 else f"report-{number}")).mkdir()
    looked_up = []

    def taken(path):
        looked_up.append(path)
        return os.path.lexists(path)

    assert choose_folder(tmp_path, "report", taken=taken) == tmp_path / "report-5001"
    assert len(looked_up) <= 2 * 13 + 2, len(looked_up)
    (tmp_path / "report-2500").rmdir()
    chosen = choose_folder(tmp_path, "report")
    assert not chosen.exists() and chosen.name in ("report-2500", "report-5001")


def test_numbered_paths(tmp_path):
    paths = numbered_paths(tmp_path, "job", ".toml")
    assert [next(paths).name for _ in range(3)] == ["job.toml", "job-2.toml", "job-3.toml"]


def test_choose_folder_honours_a_custom_taken(tmp_path):
    reserved = {tmp_path / "report", tmp_path / "report-2"}
    assert choose_folder(tmp_path, "report", taken=reserved.__contains__) == tmp_path / "report-3"


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\0b"])
def test_choose_folder_rejects_unusable_names(tmp_path, bad):
    with pytest.raises(ValueError):
        choose_folder(tmp_path, bad)


# -- job folders -------------------------------------------------------------------------------


def published_job(dest: Path) -> str:
    """The job id in the summary.json of outbox folder ``dest`` (what fill() writes)."""
    return json.loads((dest / "summary.json").read_text())["job_id"]


@pytest.fixture
def dirs(tmp_path):
    state, out = tmp_path / "state", tmp_path / "outbox"
    state.mkdir()
    out.mkdir()
    return state, out


def fill(folder: JobFolder) -> None:
    folder.write_json("summary.json", {"job_id": "j1"})
    folder.write_bytes("raw/results.jsonl", b'{"key": "a"}\n')
    with folder.open("notes.txt") as fh:
        fh.write("line 1\n")
        fh.write("line 2\n")


def test_job_folder_publish_makes_the_whole_folder_appear(dirs, tmp_path):
    state, out = dirs
    src = tmp_path / "input.csv"
    src.write_text("id,text\n1,hi\n")
    folder = JobFolder(state / "staging" / "j1")
    fill(folder)
    folder.copy_in("input.csv", src)
    dest = folder.publish(choose_folder(out, "report"))

    assert dest == out / "report"
    assert names(dest) == ["input.csv", "notes.txt", "raw", "summary.json"]
    assert (dest / "notes.txt").read_text() == "line 1\nline 2\n"
    assert (dest / "raw" / "results.jsonl").read_bytes() == b'{"key": "a"}\n'
    assert (dest / "input.csv").read_text() == src.read_text()
    assert published_job(dest) == "j1"
    assert not (state / "staging" / "j1").exists()


def test_job_folder_crash_before_publish_leaves_the_outbox_untouched(dirs):
    state, out = dirs
    staging = state / "staging" / "j1"
    fill(JobFolder(staging))  # the build "crashes" here: publish never runs
    assert staging.exists()
    assert names(out) == []

    # On restart the build is redone from scratch in the same staging directory.
    folder = JobFolder(staging)
    assert names(staging) == []
    fill(folder)
    dest = folder.publish(out / "report")
    assert names(out) == ["report"]
    assert published_job(dest) == "j1"


def test_job_folder_staged_before_a_crash_is_published_as_is(dirs):
    state, out = dirs
    staging = state / "staging" / "j1"
    fill(JobFolder(staging))  # finished, then killed before publishing
    dest = JobFolder(staging, create=False).publish(out / "report")
    assert published_job(dest) == "j1"
    assert (dest / "notes.txt").read_text() == "line 1\nline 2\n"


def test_job_folder_adopting_a_missing_staging_folder_fails(dirs):
    state, _out = dirs
    with pytest.raises(FileNotFoundError):
        JobFolder(state / "staging" / "nothing", create=False)


def test_job_folder_publish_refuses_an_existing_dest(dirs):
    state, out = dirs
    (out / "report").mkdir()
    folder = JobFolder(state / "staging" / "j1")
    fill(folder)
    with pytest.raises(FileExistsError):
        folder.publish(out / "report")
    assert names(out / "report") == []
    assert (state / "staging" / "j1" / "summary.json").exists()


def test_job_folder_rejects_reuse_and_escapes(dirs):
    state, out = dirs
    folder = JobFolder(state / "staging" / "j1")
    folder.write_bytes("a.txt", b"1")
    with pytest.raises(FileExistsError):
        folder.write_bytes("a.txt", b"2")
    for bad in ("../escape.txt", "/abs.txt", "", "a/../../b"):
        with pytest.raises(ValueError):
            folder.write_bytes(bad, b"x")
    with pytest.raises(ValueError):
        with folder.open("b.txt", mode="a"):
            pass
    folder.publish(out / "report")
    with pytest.raises(RuntimeError):
        folder.write_bytes("late.txt", b"x")
    with pytest.raises(RuntimeError):
        folder.publish(out / "again")


def test_job_folder_streams_organized_json(dirs):
    state, out = dirs
    folder = JobFolder(state / "staging" / "j1")
    with folder.open("organized.json") as fh, JsonObjectWriter(fh) as writer:
        writer.extend((f"k{i}", {"n": i}) for i in range(3))
    dest = folder.publish(out / "report")
    assert json.loads((dest / "organized.json").read_text()) == {f"k{i}": {"n": i} for i in range(3)}


# -- streamed JSON objects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"a": 1},
        {"a": {"b": [1, {"c": None}], "d": []}, "e": "multi\nline é", "f": {}, "g": [True, 1.5]},
    ],
)
def test_json_object_writer_writes_what_it_was_given(obj):
    fh = io.StringIO()
    writer = JsonObjectWriter(fh)
    for key, value in obj.items():
        writer.add(key, value)
    writer.close()
    assert json.loads(fh.getvalue()) == obj
    assert len(fh.getvalue().splitlines()) == len(obj) + 2 if obj else fh.getvalue() == "{}\n"


class CountingWriter(io.StringIO):
    """Records how much had been written after each call, to show output is streamed."""

    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []

    def write(self, text):
        result = super().write(text)
        self.lengths.append(self.tell())
        return result


def test_json_object_writer_streams_many_entries():
    fh = CountingWriter()
    writer = JsonObjectWriter(fh)
    count = 20_000
    for i in range(count):
        writer.add(f"key-{i:05d}", {"index": i, "text": f"value {i}"})
        if i == 10:
            written_early = fh.tell()
    writer.close()
    assert written_early > 0  # entries were on their way out long before the end
    assert len(fh.lengths) == count + 1
    parsed = json.loads(fh.getvalue())
    assert len(parsed) == count
    assert parsed["key-12345"] == {"index": 12345, "text": "value 12345"}


def test_json_object_writer_rejects_non_str_keys():
    fh = io.StringIO()
    writer = JsonObjectWriter(fh)
    writer.add("a", 1)
    with pytest.raises(TypeError):
        writer.add(1, 2)  # type: ignore[arg-type]
    writer.close()
    assert json.loads(fh.getvalue()) == {"a": 1}


def test_json_object_writer_unserializable_value_writes_nothing():
    fh = io.StringIO()
    writer = JsonObjectWriter(fh)
    writer.add("a", 1)
    with pytest.raises(TypeError):
        writer.add("b", object())
    writer.add("b", 2)
    writer.close()
    assert json.loads(fh.getvalue()) == {"a": 1, "b": 2}


def test_json_object_writer_context_leaves_interrupted_output_unparseable():
    fh = io.StringIO()
    with pytest.raises(RuntimeError):
        with JsonObjectWriter(fh) as writer:
            writer.add("a", 1)
            raise RuntimeError("plugin failed")
    with pytest.raises(json.JSONDecodeError):
        json.loads(fh.getvalue())


def test_a_job_succeeds_only_with_every_answer_surely_its_own_and_organized_else_its_summary_says_why():
    from types import SimpleNamespace

    from batchd.daemon.deliver import outcome_error, outcome_of
    from batchd.daemon.writer import Written

    job = SimpleNamespace(cancel_requested=False, name="n", kind="generate")

    def outcome(counts, organize_error=None, errors=None, cancelled=False):
        ran = SimpleNamespace(**{**vars(job), "cancel_requested": cancelled})
        written = Written(None, counts, {}, {}, organize_error, errors or {})
        state = outcome_of(ran, counts, organize_error)
        return state, outcome_error(ran, state, counts, written)

    assert outcome({"total": 2, "succeeded": 2, "failed": 0}) == ("succeeded", None)
    state, error = outcome({"total": 2, "succeeded": 2, "failed": 0, "joined_by_position": 2})
    assert (state, error["code"]) == ("partial", "joined_by_position") and "by position" in error["message"]
    state, error = outcome({"total": 3, "succeeded": 2, "failed": 1}, errors={"INTERNAL": {"count": 1, "message": "m"}})
    assert (state, error["code"]) == ("partial", "requests_failed") and "1 of the 3 requests failed: 1 × INTERNAL: m" \
        in error["message"]
    state, error = outcome({"total": 2, "succeeded": 2, "failed": 0}, organize_error={"message": "boom"})
    assert (state, error) == ("plugin_failed", {"code": "plugin_failed", "message": "boom"})
    state, error = outcome({"total": 2, "succeeded": 0, "failed": 2}, errors={"expired": {"count": 2, "message": ""}})
    assert (state, error["code"]) == ("failed", "requests_failed") and "(expired" in error["message"]
    state, error = outcome({"total": 2, "succeeded": 1, "failed": 1}, cancelled=True)
    assert (state, error["code"]) == ("cancelled", "cancelled")
