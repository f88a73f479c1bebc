"""Benchmark: a large file batch through the emulator, upload to download, with the real SDK.

    python bench/emulator.py                      # 10,000 and 100,000 requests, one process each
    python bench/emulator.py --sizes 100000 1000000

Each size runs in a fresh process (the emulator embedded, as batchd runs it) so that its peak RSS is
its own; a flat peak RSS across sizes shows that uploads, processing and downloads stream. The
baseline is the least any emulator must do per request: decode the input line, encode an answer
line, in a plain loop. The ratio says how much the whole HTTP + SDK + job path costs on top.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_input(path: Path, count: int) -> None:
    with open(path, "w") as file:
        for i in range(count):
            file.write(json.dumps({"key": f"r{i:07d}", "request": {
                "contents": [{"parts": [{"text": f"Translate sentence number {i} into French, please."}],
                              "role": "user"}],
                "generationConfig": {"temperature": 0.2, "maxOutputTokens": 64}}}) + "\n")


def baseline_seconds(path: Path) -> float:
    """Decode every input line and encode an answer-sized line for it, nothing else."""
    started = time.perf_counter()
    with open(path, "rb") as lines, open(path.with_suffix(".baseline"), "wb") as out:
        for raw in lines:
            item = json.loads(raw)
            answer = {"key": item["key"], "response": {"candidates": [{"content": {"role": "model", "parts": [
                {"text": item["request"]["contents"][0]["parts"][0]["text"]}]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 30, "totalTokenCount": 42}}}
            out.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
    return time.perf_counter() - started


def run_one(count: int) -> dict:
    from google import genai
    from google.genai import types

    from batchd.emulator import EmulatorServer

    with tempfile.TemporaryDirectory(prefix="bench-emulator-") as folder:
        work = Path(folder)
        source = work / "requests.jsonl"
        write_input(source, count)
        baseline = baseline_seconds(source)
        with EmulatorServer(work / "state", job_seconds=0) as emulator:
            client = genai.Client(api_key="bench", http_options=types.HttpOptions(base_url=emulator.base_url,
                                                                                  api_version="v1beta"))
            phases: dict[str, float] = {}
            started = time.perf_counter()
            uploaded = client.files.upload(file=str(source), config={"mime_type": "jsonl"})
            phases["upload"] = time.perf_counter() - started

            mark = time.perf_counter()
            job = client.batches.create(model="gemini-2.5-flash", src=uploaded.name)
            while not (job := client.batches.get(name=job.name)).done:
                time.sleep(0.05)
            phases["process"] = time.perf_counter() - mark
            assert job.state == types.JobState.JOB_STATE_SUCCEEDED, job.state

            mark = time.perf_counter()
            target = work / "results.jsonl"
            client.files.download(file=job.dest.file_name, destination=str(target))  # streamed to disk
            phases["download"] = time.perf_counter() - mark
            total = time.perf_counter() - started

            with open(target, "rb") as lines:
                answered = sum(1 for _ in lines)
            assert answered == count, (answered, count)
        return {
            "requests": count,
            "input_mb": round(source.stat().st_size / 1e6, 1),
            "output_mb": round(target.stat().st_size / 1e6, 1),
            "seconds": round(total, 2),
            **{f"{name}_s": round(value, 2) for name, value in phases.items()},
            "baseline_s": round(baseline, 2),
            "ratio": round(total / baseline, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_one(args.single)))
        return

    rows = []
    for size in args.sizes:
        result = subprocess.run([sys.executable, __file__, "--single", str(size)], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            sys.exit(f"size {size} failed:\n{result.stderr}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    columns = ["requests", "input_mb", "output_mb", "seconds", "upload_s", "process_s", "download_s",
               "baseline_s", "ratio", "peak_rss_mb"]
    print("  ".join(f"{c:>11}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]:>11}" for c in columns))
    per_request = rows[-1]["seconds"] / rows[-1]["requests"] * 1e6
    print(f"\n{per_request:.1f} us per request end to end at {rows[-1]['requests']:,} requests; "
          f"peak RSS {rows[0]['peak_rss_mb']} MB -> {rows[-1]['peak_rss_mb']} MB across sizes")


if __name__ == "__main__":
    main()
