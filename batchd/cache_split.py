"""A build's split of a job's requests: those the request cache answers and those sent (:class:`CacheSplit`).

The store itself, shared by every job, is :mod:`batchd.cache`; what is decided here is kept in the job's
spool (``cached.jsonl``, see :mod:`batchd.spool`), so a rebuild after a crash decides the same.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from batchd import fs
from batchd.cache import CacheHit, CacheMiss, CacheStore, request_hash
from batchd.spool import IO_BUFFER, JobSpool
from batchd.task import TaskRequest


class CacheSplit:
    """Which of a job's requests are answered from the request cache, decided once for good.

    :meth:`tag` encodes each request, hashes its canonical form (:mod:`batchd.cache`) and looks the
    hash up in the store; a hit's answer is appended to the spool's ``cached.jsonl``
    (``{"n": position, "key", "response"}``). Before each chunk is yielded to the loop (and at the
    end) the build writes ``{"upto": n}`` there and fsyncs it: the decisions of the requests before
    position n are final. A rebuild after a crash first cuts the file after its last mark and takes
    the decisions before it from the file, not from the store: chunks already recorded, perhaps
    sent, come out the same whatever the store became since (pruned, evicted, or holding answers
    another job stored meanwhile), and an answer taken from the store before is never lost. Only
    the requests after the mark are looked up again. Nothing is held per request.

    ``store`` is None when the job's cache is off (a job whose setting changed since its first
    build pass still keeps the decisions made then).
    """

    def __init__(self, spool: JobSpool, store: Path | None, kind: str, model: str,
                 encode: Callable[[TaskRequest], str]):
        self.path = spool.cached_path
        self.store_path = store
        self.kind, self.model = kind, model
        self.encode = encode
        #: Requests answered from the cache so far (read by the loop once the build has ended).
        self.hits = 0
        self._out = None

    def _resume(self) -> int:
        """Cut the file after its last mark; the position that mark makes final (0: none)."""
        if not self.path.exists():
            return 0
        upto, keep = 0, 0
        with open(self.path, "rb") as lines:
            offset = 0
            for line in lines:
                offset += len(line)
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if "upto" in record:
                    upto, keep = record["upto"], offset
        with open(self.path, "r+b") as file:
            file.truncate(keep)
            fs.fsync(file.fileno(), self.path, "requests")
        return upto

    def tag(self, requests: Iterable[TaskRequest]) -> Iterator[CacheHit | CacheMiss]:
        frozen = self._resume()
        earlier = iter(())
        if frozen:
            earlier = itertools.takewhile(lambda r: r["n"] < frozen, JobSpool(self.path.parent).read_cached())
        before = next(earlier, None)
        store = None
        self._out = open(self.path, "a", encoding="utf-8", buffering=IO_BUFFER)
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        try:
            count = 0
            for n, request in enumerate(requests):
                count = n + 1
                if request.error is not None:  # a file it cannot send: never sent, nor answered from the cache
                    yield CacheMiss(request, "", None)
                    continue
                line = self.encode(request)
                wants_json = request.config.get("response_mime_type") == "application/json"
                digest = None
                if self.store_path is not None:
                    digest = request_hash(self.kind, self.model, json.loads(line)["request"])
                if n < frozen:
                    if before is not None and before["n"] == n:
                        if before["key"] != request.key:
                            raise RuntimeError(
                                f"request {n} came out with key {request.key!r} when rebuilt after a restart, "
                                f"{before['key']!r} before: the task must build the same requests from the same "
                                "manifest")
                        self.hits += 1
                        before = next(earlier, None)
                        yield CacheHit(request.key, request.input, wants_json)
                    else:
                        yield CacheMiss(request, line, digest)
                    continue
                response = None
                if digest is not None:
                    if store is None:
                        store = CacheStore.reader(self.store_path) or False
                    if store:
                        response = store.get_text(digest)  # JSON text, written as it is stored
                if response is None:
                    yield CacheMiss(request, line, digest)
                    continue
                self._out.write(f'{{"n":{n},"key":{dumps(request.key)},"response":{response}}}\n')
                self.hits += 1
                yield CacheHit(request.key, request.input, wants_json)
            self.boundary(count)  # the end: every decision is final before the last chunk is yielded
        finally:
            if store:
                store.close()
            self._out.close()

    def boundary(self, n: int) -> None:
        """Make the decisions before request ``n`` final: write the mark and fsync."""
        out = self._out
        if out is None or out.closed:
            return
        out.write(json.dumps({"upto": n}) + "\n")
        out.flush()
        fs.fsync(out.fileno(), self.path, "requests")
