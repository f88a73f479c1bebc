"""Media inputs: a folder of files or a CSV column of paths sent with a prompt, files uploaded once
through the Files API (journal intents, reused across jobs, deleted when no job needs them), small ones
inline, bad ones failing their item only."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest

from batchd.media import MediaError, MediaResolver, mime_type_of
from batchd.testing import Workspace
from test_daemon import request_files

#: Files up to this size go inline in these tests; the PDFs are made larger so they are uploaded.
INLINE = 1024


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


def test_a_folder_job_uploads_each_file_once_and_a_second_job_reuses_them(ws: Workspace):
    make_scans(ws.inbox / "scans")
    ws.drop("scans.toml", 'task = "documents"\ninput = "scans/"\nprompt = "Summarize {document}."\n')
    result = ws.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    folder = ws.outbox_folder("scans")
    results = {r["input"]["id"]: r for r in folder.results}
    assert sorted(results) == ["a.pdf", "b.pdf", "c.png"]
    assert all(r["status"] == "ok" for r in results.values()), results
    assert len(media_uploads(ws)) == 2  # the two PDFs; the PNG went inline
    assert all(row["state"] == "active" for row in media_rows(ws))

    ws.drop("again.toml", 'task = "documents"\ninput = "scans/"\nprompt = "List the topics of {document}."\n')
    result = ws.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    assert all(r["status"] == "ok" for r in ws.outbox_folder("again").results)
    assert len(media_uploads(ws)) == 2  # nothing new uploaded
