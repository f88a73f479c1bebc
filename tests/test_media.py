"""Media inputs: a folder of files or a CSV column of paths sent with a prompt, files uploaded once
through the Files API (journal intents, reused across jobs, deleted when no job needs them), small ones
inline, bad ones failing their item only."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest

from batchd.manifest import load_manifest
from batchd.media import MediaError, MediaResolver, mime_type_of
from batchd.testing import Workspace
from test_daemon import request_files

#: Files up to this size go inline in these tests: the PDFs (the example's too) are larger, so they are uploaded.
INLINE = 600
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "media"


def make_example_scans(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_scans", EXAMPLE / "make_scans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(folder)


def pdf(text: str, size: int = 3000) -> bytes:
    """A small valid-looking PDF of about ``size`` bytes whose content depends on ``text``."""
    body = f"%PDF-1.4\n% {text}\n1 0 obj << /Type /Catalog >> endobj\n".encode()
    return body + b"%" + b"x" * max(0, size - len(body) - 7) + b"\n%%EOF\n"


def png(seed: int) -> bytes:
    """A 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x00" + bytes([seed % 256, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_scans(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.pdf").write_bytes(pdf("first"))
    (folder / "b.pdf").write_bytes(pdf("second"))
    (folder / "c.png").write_bytes(png(7))


def media_uploads(ws: Workspace) -> list[str]:
    return sorted(name for name in request_files(ws) if name.startswith("batchd-media-"))


def media_rows(ws: Workspace) -> list[dict]:
    db = sqlite3.connect(ws.state / "journal.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM media ORDER BY sha256")]
    finally:
        db.close()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path, media_inline_max_bytes=INLINE)


def test_the_example_folder_job_uploads_each_file_once_and_a_second_job_reuses_them(ws: Workspace):
    """examples/media: its folder made by its script, its manifest as shipped."""
    make_example_scans(ws.inbox / "scans")
    (ws.inbox / "scans.toml").write_bytes((EXAMPLE / "scans.toml").read_bytes())
    result = ws.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    folder = ws.outbox_folder("scans")
    results = {r["input"]["id"]: r for r in folder.results}
    assert sorted(results) == ["invoice.pdf", "letter.pdf", "photo.png"]
    assert all(r["status"] == "ok" for r in results.values()), results
    assert folder.summary["state"] == "succeeded"
    assert len(media_uploads(ws)) == 2  # the two PDFs; the PNG went inline
    assert all(row["state"] == "active" for row in media_rows(ws))

    # Again as requests files, one request a chunk: each chunk's file names the Files' URIs.
    ws.configure(media_inline_max_bytes=INLINE, inline_max_requests=0, chunk_max_requests=1)
    ws.drop("again.toml", 'task = "documents"\ninput = "scans/"\nprompt = "List the topics of {document}."\n')
    result = ws.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    again = ws.outbox_folder("again")
    assert all(r["status"] == "ok" for r in again.results)
    assert [batch["mode"] for batch in again.summary["remote_batches"]] == ["file"] * 3
    assert len(media_uploads(ws)) == 2  # nothing new uploaded


@pytest.mark.slow
def test_a_media_jobs_estimate_prices_its_files_with_or_without_a_budget(ws: Workspace):
    """Without a budget the build pass prices the job; with one, the estimate pass before admission does,
    checking and sizing the files without keeping them. Both count the files' tokens."""
    make_example_scans(ws.inbox / "scans")
    ws.drop("plain.toml", (EXAMPLE / "scans.toml").read_text())
    ws.batchd("run", "--once")
    ws.configure(media_inline_max_bytes=INLINE, cost={"job_budget": 1000.0})
    make_example_scans(ws.inbox / "scans")
    ws.drop("budget.toml", (EXAMPLE / "scans.toml").read_text() + "# priced before admission\n")
    ws.batchd("run", "--once")
    for name in ("plain", "budget"):
        details = ws.outbox_folder(name).summary["cost"]["estimate_details"]
        assert "3 file(s)" in details["method"], (name, details)


def test_a_folder_input_is_told_apart_by_its_listing(tmp_path: Path):
    make_scans(tmp_path / "scans")
    path = tmp_path / "m.toml"
    path.write_text('task = "documents"\ninput = "scans/"\nprompt = "Summarize {document}."\n')
    before = load_manifest(path, root=tmp_path).folder_fingerprint()
    assert before and before == load_manifest(path, root=tmp_path).folder_fingerprint()
    (tmp_path / "scans" / "d.pdf").write_bytes(pdf("fourth"))
    assert load_manifest(path, root=tmp_path).folder_fingerprint() != before
    assert [item.id for item in load_manifest(path, root=tmp_path).inputs] == ["a.pdf", "b.pdf", "c.png", "d.pdf"]


def test_a_csv_column_of_paths_and_bad_files_fail_their_items_only(ws: Workspace):
    """With the request cache on: a bad file's request is never sent nor cached; the good ones are,
    and a second job of the same rows takes them from the cache."""
    docs = ws.inbox / "docs"
    docs.mkdir()
    (docs / "good.pdf").write_bytes(pdf("good"))
    (docs / "small.png").write_bytes(png(1))
    (docs / "notes.exe").write_bytes(b"MZ" + b"\0" * 100)
    (docs / "fake.pdf").write_bytes(png(2) + b"\0" * 2000)  # a PNG calling itself a PDF
    os.symlink("/etc/passwd", docs / "link.pdf")
    os.mkfifo(docs / "pipe.pdf")
    with open(docs / "huge.pdf", "wb") as huge:  # sparse: 2 GB + 1 byte that take no room
        huge.write(b"%PDF-1.4\n")
        huge.truncate(2 * 1024**3 + 1)
    rows = (
        "id,path,title\n1,docs/good.pdf,Good\n2,docs/small.png,Small\n3,docs/notes.exe,Exe\n4,docs/fake.pdf,Fake\n"
        "5,docs/link.pdf,Link\n6,docs/pipe.pdf,Pipe\n7,docs/missing.pdf,Missing\n8,../outside.pdf,Outside\n"
        "9,docs/huge.pdf,Huge\n")
    (ws.inbox / "papers.csv").write_text(rows)
    manifest = ('task = "template"\ninput = "papers.csv"\nfile_column = "path"\ncache = true\n'
                'template = "Describe the paper {title}."\n')
    ws.drop("papers.toml", manifest)
    result = ws.batchd("run", "--once", timeout=60)
    results = {r["input"]["id"]: r for r in ws.outbox_folder("papers").results}
    assert [results[key]["status"] for key in "12"] == ["ok", "ok"]
    errors = {key: results[key]["error"]["message"] for key in "3456789"}
    assert all(results[key]["error"]["code"] == "bad_file" for key in "3456789")
    assert "unsupported file type '.exe'" in errors["3"]
    assert "image/png, not the application/pdf" in errors["4"]
    assert "symlink" in errors["5"]
    assert "FIFO" in errors["6"]
    assert "no such file" in errors["7"]
    assert "no '..'" in errors["8"]
    assert "2,147,483,649 bytes, larger than the 2,147,483,648 bytes" in errors["9"]
    assert ws.outbox_folder("papers").summary["state"] == "partial", result.stderr
    assert len(media_uploads(ws)) == 1

    (ws.inbox / "papers.csv").write_text(rows)  # the first job took its input with it
    ws.drop("again.toml", manifest + "# the same rows again\n")
    ws.batchd("run", "--once", timeout=60)
    again = {r["input"]["id"]: r for r in ws.outbox_folder("again").results}
    assert [again[key].get("cached") for key in "12"] == [True, True]
    assert [again[key]["error"]["code"] for key in "3456789"] == ["bad_file"] * 7


def test_too_large_and_empty_files_are_refused_before_upload(tmp_path: Path):
    (tmp_path / "big.pdf").write_bytes(pdf("big", 5000))
    (tmp_path / "empty.png").write_bytes(b"")
    resolver = MediaResolver(tmp_path, tmp_path / "store", inline_max_bytes=100, max_bytes=4000)
    with pytest.raises(MediaError, match="bytes, larger than the 4,000 bytes"):
        resolver.resolve("big.pdf")
    with pytest.raises(MediaError, match="empty"):
        resolver.resolve("empty.png")
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_mime_types_by_extension_and_by_content():
    assert mime_type_of("x.PDF", b"%PDF-1.7") == "application/pdf"
    assert mime_type_of("scan", b"\x89PNG\r\n\x1a\n") == "image/png"
    assert mime_type_of("clip.webp", b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert mime_type_of("talk.mp3", b"ID3\x03") == "audio/mp3"
    assert mime_type_of("notes.txt", b"hello") == "text/plain"
    with pytest.raises(MediaError, match="unsupported"):
        mime_type_of("blob.bin", b"\0\1\2")


def test_the_emulator_answers_file_parts_deterministically_and_refuses_unsupported_types(emulator, tmp_path: Path):
    from google.genai import errors, types

    client = emulator.client()
    paths = []
    for text in ("one", "two"):
        path = tmp_path / f"{text}.pdf"
        path.write_bytes(pdf(text))
        paths.append(path)
    files = [client.files.upload(file=path, config={"mime_type": "application/pdf"}) for path in paths]

    def answer(file) -> str:
        parts = [types.Part.from_uri(file_uri=file.uri, mime_type="application/pdf"), types.Part(text="Summarize.")]
        return client.models.generate_content(model="gemini-2.5-flash", contents=[types.Content(
            role="user", parts=parts)]).text

    assert answer(files[0]) == answer(files[0])
    assert answer(files[0]) != answer(files[1])
    inline = types.Part.from_bytes(data=b"MZ\0\0", mime_type="application/x-msdownload")
    with pytest.raises(errors.ClientError, match="Unsupported MIME type"):
        client.models.generate_content(model="gemini-2.5-flash", contents=[types.Content(
            role="user", parts=[inline, types.Part(text="What is this?")])])
    client.files.delete(name=files[1].name)
    with pytest.raises(errors.ClientError, match="permission"):
        answer(files[1])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after-media-intent", "after-media-upload"])
def test_a_kill_around_an_upload_uploads_nothing_twice_and_the_files_are_deleted_once_done(ws: Workspace, point):
    make_scans(ws.inbox / "scans")
    ws.drop("scans.toml", 'task = "documents"\ninput = "scans/"\nprompt = "Summarize {document}."\n')
    killed = ws.batchd("run", "--once", BATCHD_CRASH_AT=point)
    assert killed.returncode == -9, killed.stderr
    rows = media_rows(ws)
    assert rows and any(row["state"] == "uploading" for row in rows)

    result = ws.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    assert all(r["status"] == "ok" for r in ws.outbox_folder("scans").results)
    uploads = media_uploads(ws)
    assert len(uploads) == len(set(uploads)) == 2, uploads  # one upload per file, the killed one's reused

    ws.configure(media_inline_max_bytes=INLINE, media_keep_seconds=0)
    process = ws.start("run")
    try:
        ws.wait_for(lambda: all(row["state"] == "deleted" for row in media_rows(ws)), timeout=30,
                    what="the uploaded files deleted")
    finally:
        assert process.stop() == 0
    assert media_uploads(ws) == []


def test_a_hostile_folder_fails_its_bad_files_one_by_one(tmp_path: Path):
    """Symlinks, FIFOs, hard links, folders, non-UTF-8 names, dotfiles: each bad entry is its item's error."""
    scans = tmp_path / "scans"
    make_scans(scans)
    (scans / ".hidden.pdf").write_bytes(pdf("hidden"))
    os.symlink(scans / "a.pdf", scans / "link.pdf")
    os.mkfifo(scans / "pipe.pdf")
    (scans / "sub").mkdir()
    (tmp_path / "elsewhere.pdf").write_bytes(pdf("elsewhere"))
    os.link(tmp_path / "elsewhere.pdf", scans / "hardlink.pdf")
    (scans / os.fsdecode(b"caf\xe9.pdf")).write_bytes(pdf("latin-1 name"))
    path = tmp_path / "m.toml"
    path.write_text('task = "documents"\ninput = "scans/"\nprompt = "Summarize {document}."\n')
    manifest = load_manifest(path, root=tmp_path)
    resolver = MediaResolver(tmp_path, tmp_path / "spool" / "media", inline_max_bytes=INLINE)
    requests = {request.key: request for request in manifest.requests(resolver)}
    assert sorted(requests) == sorted(["a.pdf", "b.pdf", "c.png", "caf\\xe9.pdf", "hardlink.pdf", "link.pdf",
                                       "pipe.pdf", "sub"])
    errors = {key: request.error["message"] for key, request in requests.items() if request.error}
    assert sorted(errors) == ["hardlink.pdf", "link.pdf", "pipe.pdf", "sub"]
    assert "2 hard links" in errors["hardlink.pdf"] and "symlink" in errors["link.pdf"]
    assert "FIFO" in errors["pipe.pdf"] and "a folder" in errors["sub"]
    uploaded = requests["caf\\xe9.pdf"].files[0]
    assert uploaded.inline_data is None and uploaded.mime_type == "application/pdf"
    assert (tmp_path / "spool" / "media" / uploaded.sha256).read_bytes() == pdf("latin-1 name")
    assert requests["c.png"].files[0].inline_data is not None  # small: inline
    assert requests["a.pdf"].files and not requests["a.pdf"].error


def test_each_request_of_an_item_carries_its_file_and_a_task_may_add_its_own(tmp_path: Path):
    from batchd.encoding import RequestEncoder

    make_scans(tmp_path / "scans")
    (tmp_path / "items.jsonl").write_text('{"id": "x", "text": "Quarterly report", "scan": "scans/a.pdf"}\n'
                                          '{"id": "y", "scan": "scans/c.png"}\n')
    path = tmp_path / "m.toml"
    path.write_text('task = "analysis"\ninput = "items.jsonl"\nfile_column = "scan"\n'
                    'analyses = ["summary", "themes"]\n')
    resolver = MediaResolver(tmp_path, tmp_path / "store", inline_max_bytes=INLINE)
    requests = list(load_manifest(path, root=tmp_path).requests(resolver))
    assert [(r.key, len(r.files)) for r in requests] == [("x:summary", 1), ("x:themes", 1), ("y:summary", 1),
                                                         ("y:themes", 1)]
    assert requests[0].files == requests[1].files != requests[2].files
    line = json.loads(RequestEncoder("gemini-2.5-flash").encode(requests[0]))
    parts = line["request"]["contents"][0]["parts"]
    assert parts[0] == {"fileData": {"mimeType": "application/pdf", "fileUri": f"batchd-media:{requests[0].files[0].sha256}"}}
    assert "Quarterly report" in parts[1]["text"]
    assert "scans/c.png" in json.loads(RequestEncoder("m").encode(requests[2]))["request"]["contents"][0]["parts"][1]["text"]


def test_a_plugin_task_sends_files_of_its_own_through_task_request_files(tmp_path: Path):
    from batchd.task import FilePart, TaskRequest, TextTask

    class Rubric(TextTask):
        name = "rubric"

        def requests(self, params, items):
            for item in items:
                yield TaskRequest(key=item.id, prompt=f"Grade: {item.text}", input={"id": item.id},
                                  files=(FilePart("scans/b.pdf"), FilePart("scans/missing.pdf"))
                                  if item.id == "2" else (FilePart("scans/b.pdf"),))

    make_scans(tmp_path / "scans")
    path = tmp_path / "m.toml"
    path.write_text('task = "rubric"\ntexts = ["first answer", "second answer"]\n')
    resolver = MediaResolver(tmp_path, tmp_path / "store", inline_max_bytes=INLINE)
    first, second = load_manifest(path, root=tmp_path, tasks={"rubric": Rubric()}).requests(resolver)
    assert [ref.mime_type for ref in first.files] == ["application/pdf"] and first.error is None
    assert second.files == () and second.error["code"] == "bad_file" and "missing.pdf" in second.error["message"]
