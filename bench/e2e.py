"""End-to-end benchmark: an N-row CSV sentiment job through ``batchd run --once`` on the embedded emulator.

The floor is measured in the same run: a straight script doing the same JSON encoding and parsing and
the same file writes (requests file, emulated answers, results and organized output) with none of
batchd's machinery.  It builds byte-for-byte the requests batchd sends (the sentiment task's prompt,
settings and response schema), so both encode and parse the same amount of JSON.  Printed: wall
seconds of both, their ratio and the peak RSS of batchd with its child processes (the embedded
emulator runs in one), also split into the two.

    python bench/e2e.py --requests 100000
    python bench/e2e.py --requests 10000 --requests 1000000     # memory must stay flat in N
    python bench/e2e.py --requests 100000 --cache   # cache = true, then the same job again from the cache
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from batchd_plugins.sentiment import PROMPT, RESPONSE_SCHEMA

WORDS = ("great", "terrible", "fine", "slow", "fast", "broken", "lovely", "cheap", "support", "delivery",
         "battery", "screen", "price", "quality", "refund", "works", "never", "again", "recommend", "love")

CONFIG = """\
inbox = "inbox"
outbox = "outbox"
state_dir = "state"
provider = "emulator"
poll_interval = 0.2
poll_max_interval = 1.0
settle_seconds = 0
rescan_seconds = 5

[emulator]
job_seconds = 0
"""



def write_csv(path: Path, rows: int) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "text"])
        for n in range(rows):
            words = " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(12))
            writer.writerow([f"r{n}", f"Review {n}: {words}."])


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc (Linux)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*/children"):
            try:
                tree += [int(child) for child in task.read_text().split()]
            except OSError:
                pass  # the task ended meanwhile
        index += 1
    return tree


def _high_water_mark(pid: int) -> int:
    """VmHWM (peak RSS so far, bytes) of a live process; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class TreeMemory:
    """Peak RSS of a process and its descendants.

    ``wait4``'s ``ru_maxrss`` is the largest of the process and its reaped children, not their sum, so
    it misses the embedded emulator's share.  This samples every process's own high-water mark
    (VmHWM, which the kernel keeps exactly) while the tree runs; their sum bounds the tree's peak
    from above, whether or not the processes peaked at the same moment.
    """

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._done.wait(every):
            for pid in _process_tree(self.pid):
                self.peaks[pid] = max(self.peaks.get(pid, 0), _high_water_mark(pid))

    def stop(self, main_maxrss: int) -> tuple[int, int]:
        """(peak of the main process, peak of all the others summed), bytes."""
        self._done.set()
        self._thread.join()
        main = max(self.peaks.pop(self.pid, 0), main_maxrss)
        return main, sum(self.peaks.values())


def run_batchd(workspace: Path) -> tuple[float, int, int, int]:
    """Wall seconds, peak RSS of batchd and of its children (bytes) and exit code of ``batchd run --once``."""
    env = {**os.environ, "BATCHD_CONFIG": str(workspace / "config.toml")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "batchd", "--log-level", "WARNING", "run", "--once"],
                               cwd=workspace, env=env)
    memory = TreeMemory(process.pid)
    # The sampler reads /proc/<pid> until wait4 reaps it; ru_maxrss then covers its very last moments
    # (it is also the largest reaped child's, which can only make the main figure larger).
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    main_rss, children_rss = memory.stop(usage.ru_maxrss * 1024)
    return elapsed, main_rss, children_rss, os.waitstatus_to_exitcode(status)


def floor(workspace: Path) -> None:
    """The same JSON and file work as batchd does, in one straight loop per stage."""
    dumps, loads = json.dumps, json.loads
    config = {"temperature": 0.0, "responseMimeType": "application/json", "responseJsonSchema": RESPONSE_SCHEMA}
    reviews, requests, answers = workspace / "inbox" / "reviews.csv", workspace / "requests.jsonl", \
        workspace / "answers.jsonl"
    # Build: every row becomes the request line batchd uploads.
    with open(reviews, newline="") as rows, open(requests, "w") as out:
        for row in csv.DictReader(rows):
            out.write(dumps({"key": row["id"], "request": {
                "contents": [{"parts": [{"text": PROMPT.format(context="", text=row["text"])}], "role": "user"}],
                "generationConfig": config}}, ensure_ascii=False, separators=(",", ":")) + "\n")
    # The service: parse every request, answer it.
    with open(requests, "rb") as lines, open(answers, "wb") as out:
        for line in lines:
            request = loads(line)
            text = dumps({"label": "positive", "score": 0.5, "rationale": "emulated"}, separators=(",", ":"))
            out.write(dumps({"key": request["key"], "response": {
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                                "index": 0}],
                "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 12, "totalTokenCount": 32}}},
                separators=(",", ":")).encode() + b"\n")
    # Deliver: parse every answer and its structured text, join the inputs back (answers come in
    # request order here), write results.jsonl and organized.json.
    with open(answers, "rb") as lines, open(reviews, newline="") as rows, \
            open(workspace / "results.jsonl", "w") as results, open(workspace / "organized.json", "w") as organized:
        organized.write("{\n")
        for line, row in zip(lines, csv.DictReader(rows)):
            answer = loads(line)
            text = answer["response"]["candidates"][0]["content"]["parts"][0]["text"]
            data = loads(text)
            results.write(dumps({"key": answer["key"], "input": {"id": row["id"], "text": row["text"]},
                                 "status": "ok", "text": text, "data": data, "error": None,
                                 "usage": answer["response"]["usageMetadata"]}, ensure_ascii=False) + "\n")
            organized.write(f"  {dumps(answer['key'])}: {dumps(data)},\n")
        organized.write("}\n")


def measure(rows: int, cache: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        workspace = Path(tmp)
        for folder in ("inbox", "outbox"):
            (workspace / folder).mkdir()
        (workspace / "config.toml").write_text((f"cache = true\ncache_max_entries = {rows}\ncache_max_mb = 100000\n"
                                                if cache else "") + CONFIG)
        write_csv(workspace / "inbox" / "reviews.csv", rows)

        floor_dir = workspace / "floor"
        (floor_dir / "inbox").mkdir(parents=True)
        os.link(workspace / "inbox" / "reviews.csv", floor_dir / "inbox" / "reviews.csv")
        started = time.perf_counter()
        floor(floor_dir)
        floor_seconds = time.perf_counter() - started
        (floor_dir / "inbox" / "reviews.csv").unlink()  # batchd refuses an input with a second name

        (workspace / "inbox" / "reviews.toml").write_text('task = "sentiment"\ninput = "reviews.csv"\n')
        seconds, main_rss, children_rss, code = run_batchd(workspace)
        summary = json.loads((workspace / "outbox" / "reviews" / "summary.json").read_text())
        assert code == 0 and summary["counts"]["total"] == rows, (code, summary)
        again = None
        if cache:  # the same requests again (other bytes: an identical manifest is refused as a duplicate)
            (workspace / "inbox" / "again.toml").write_text('task = "sentiment"\ninput = "reviews.csv"\n# again\n')
            again = run_batchd(workspace)
            summary = json.loads((workspace / "outbox" / "again" / "summary.json").read_text())
            assert again[3] == 0 and summary["counts"].get("cached") == rows, (again, summary)
    result = {"requests": rows, "batchd_s": seconds, "floor_s": floor_seconds,
              "ratio": seconds / floor_seconds, "peak_rss_mb": (main_rss + children_rss) / 2**20,
              "batchd_rss_mb": main_rss / 2**20, "children_rss_mb": children_rss / 2**20}
    if again is not None:
        result["cached_s"], result["cached_rss_mb"] = again[0], (again[1] + again[2]) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, action="append", help="rows in the job (repeatable)")
    parser.add_argument("--cache", action="store_true",
                        help="cache = true, then run the same job again, answered whole from the request cache")
    args = parser.parse_args()
    sizes = args.requests or [100_000]
    print(f"{'requests':>10} {'batchd s':>9} {'floor s':>8} {'ratio':>6} {'peak RSS MB':>12} "
          f"{'(batchd + emulator)':>20}")
    for rows in sizes:
        r = measure(rows, args.cache)
        print(f"{r['requests']:>10} {r['batchd_s']:>9.2f} {r['floor_s']:>8.2f} {r['ratio']:>6.2f} "
              f"{r['peak_rss_mb']:>12.1f} {r['batchd_rss_mb']:>10.1f} + {r['children_rss_mb']:>7.1f}", flush=True)
        if "cached_s" in r:
            print(f"{'':>10} again, from the request cache: {r['cached_s']:.2f} s, peak RSS {r['cached_rss_mb']:.1f} MB",
                  flush=True)


if __name__ == "__main__":
    main()
