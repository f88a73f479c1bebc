"""End-to-end benchmark: an N-row CSV sentiment job through ``batchd run --once`` on the embedded emulator.

The floor is measured in the same run: a straight script doing the same JSON encoding and parsing and
the same file writes (requests file, emulated answers, results and organized output) with none of
batchd's machinery.  Printed: wall seconds of both, their ratio and batchd's peak RSS.

    python bench/e2e.py --requests 100000
    python bench/e2e.py --requests 10000 --requests 1000000     # memory must stay flat in N
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

SCHEMA = {"type": "object", "properties": {
    "label": {"type": "string", "enum": ["positive", "negative", "neutral", "mixed"]},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "rationale": {"type": "string"}}, "required": ["label", "score", "rationale"]}


def write_csv(path: Path, rows: int) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "text"])
        for n in range(rows):
            words = " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(12))
            writer.writerow([f"r{n}", f"Review {n}: {words}."])


def run_batchd(workspace: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes) and exit code of ``batchd run --once``."""
    env = {**os.environ, "BATCHD_CONFIG": str(workspace / "config.toml")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "batchd", "--log-level", "WARNING", "run", "--once"],
                               cwd=workspace, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    return elapsed, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def floor(workspace: Path) -> None:
    """The same JSON and file work as batchd does, in one straight loop per stage."""
    dumps, loads = json.dumps, json.loads
    config = {"responseMimeType": "application/json", "responseJsonSchema": SCHEMA}
    requests, answers = workspace / "requests.jsonl", workspace / "answers.jsonl"
    with open(workspace / "inbox" / "reviews.csv", newline="") as rows, open(requests, "w") as out:
        for row in csv.DictReader(rows):
            out.write(dumps({"key": row["id"], "request": {
                "contents": [{"parts": [{"text": f"Classify the sentiment: {row['text']}"}], "role": "user"}],
                "generationConfig": config}}) + "\n")
    with open(requests) as lines, open(answers, "w") as out:
        for line in lines:
            request = loads(line)
            text = dumps({"label": "positive", "score": 0.5, "rationale": "emulated"})
            out.write(dumps({"key": request["key"], "response": {
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 12, "totalTokenCount": 32}}}) + "\n")
    with open(answers) as lines, open(workspace / "results.jsonl", "w") as results, \
            open(workspace / "organized.json", "w") as organized:
        organized.write("{\n")
        for line in lines:
            answer = loads(line)
            text = answer["response"]["candidates"][0]["content"]["parts"][0]["text"]
            data = loads(text)
            results.write(dumps({"key": answer["key"], "status": "ok", "text": text, "data": data,
                                 "usage": answer["response"]["usageMetadata"]}) + "\n")
            organized.write(f"  {dumps(answer['key'])}: {dumps(data)},\n")
        organized.write("}\n")


def measure(rows: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        workspace = Path(tmp)
        for folder in ("inbox", "outbox"):
            (workspace / folder).mkdir()
        (workspace / "config.toml").write_text(CONFIG)
        write_csv(workspace / "inbox" / "reviews.csv", rows)

        floor_dir = workspace / "floor"
        (floor_dir / "inbox").mkdir(parents=True)
        os.link(workspace / "inbox" / "reviews.csv", floor_dir / "inbox" / "reviews.csv")
        started = time.perf_counter()
        floor(floor_dir)
        floor_seconds = time.perf_counter() - started

        (workspace / "inbox" / "reviews.toml").write_text('task = "sentiment"\ninput = "reviews.csv"\n')
        seconds, peak_rss, code = run_batchd(workspace)
        summary = json.loads((workspace / "outbox" / "reviews" / "summary.json").read_text())
        assert code == 0 and summary["counts"]["total"] == rows, (code, summary)
    return {"requests": rows, "batchd_s": seconds, "floor_s": floor_seconds,
            "ratio": seconds / floor_seconds, "peak_rss_mb": peak_rss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, action="append", help="rows in the job (repeatable)")
    sizes = parser.parse_args().requests or [100_000]
    print(f"{'requests':>10} {'batchd s':>9} {'floor s':>8} {'ratio':>6} {'peak RSS MB':>12}")
    for rows in sizes:
        r = measure(rows)
        print(f"{r['requests']:>10} {r['batchd_s']:>9.2f} {r['floor_s']:>8.2f} {r['ratio']:>6.2f} "
              f"{r['peak_rss_mb']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
