"""The floor: a plain script making, for each of N small jobs, the SDK calls a user's own script would.

Per job, with the real SDK: ``batches.create`` with the job's two requests inline, ``batches.get``
until it is done (the get also brings the inline answers back), then the answers written to a file;
one job after another (``--threads 1``) or from a ThreadPoolExecutor (a script that overlaps jobs).
It imports nothing but the SDK and the standard library, so that, run as a process, its wall time
from launch is what ``time python floor.py`` tells a user: its interpreter's start and the SDK's
import included, as batchd's are in its own wall time. The benchmarks start an emulator first (the
service, already up) and either run this file as a process (bench/many_jobs.py) or call
:func:`run` in their own (bench/burst.py, through common.sdk_floor).

    python bench/floor.py --base-url http://127.0.0.1:PORT --jobs 1000 --threads 4 --out DIR

prints ``{"seconds": ..., "done": ...}``: the seconds of the calls alone (from the first create).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from google import genai
from google.genai import types

MODEL = "gemini-2.5-flash"


def sdk_client(base_url: str, api_key: str = "bench") -> genai.Client:
    return genai.Client(api_key=api_key, http_options=types.HttpOptions(base_url=base_url, api_version="v1beta"))


def sdk_job(client: genai.Client, n: int, out: Path) -> None:
    """What a plain script does per job: create it with its two requests inline, get it until it is done
    (the get brings the inline answers back), write the answers to a file."""
    requests = [{"contents": [{"parts": [{"text": f"Text {k} of job {n}."}], "role": "user"}],
                 "metadata": {"key": str(k)}} for k in (1, 2)]
    job = client.batches.create(model=MODEL, src=requests, config=types.CreateBatchJobConfig(display_name=f"floor-{n}"))
    while not (job := client.batches.get(name=job.name)).done:
        time.sleep(0.001)
    answers = [r.response.text if r.response else None for r in job.dest.inlined_responses]
    (out / f"{n}.json").write_text(json.dumps(answers))


def run(base_url: str, jobs: int, out: Path, threads: int = 1, timeout: float = 1e9) -> tuple[float, int]:
    """Seconds for ``jobs`` jobs (one client per thread, as a script keeps its connections), and the jobs
    done before ``timeout`` seconds."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    started = time.perf_counter()
    if threads == 1:
        client, done = sdk_client(base_url), 0
        for n in range(jobs):
            if time.monotonic() > deadline:
                break
            sdk_job(client, n, out)
            done += 1
        return time.perf_counter() - started, done
    local = threading.local()

    def one(n: int) -> bool:
        if time.monotonic() > deadline:
            return False
        if not hasattr(local, "client"):
            local.client = sdk_client(base_url)
        sdk_job(local.client, n, out)
        return True

    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(one, range(jobs)))
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seconds, done = run(args.base_url, args.jobs, args.out, threads=args.threads)
    print(json.dumps({"seconds": seconds, "done": done}))


if __name__ == "__main__":
    main()
