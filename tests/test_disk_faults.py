"""Disk faults (reliability.md B8, "Filesystem faults"): a full disk at each writing step is retried
with the job kept in its state and delivered once there is room; a failed fsync or journal commit ends
the daemon with exit 74 and a restart delivers exactly once; below min_free_mb nothing new is claimed.

Faults come from two sources. ``BATCHD_FS_FAULT=<step>:<ERRNO>`` (batchd.fs) makes a named step's
writes fail inside the real daemon process, deterministically and without privileges; with
``BATCHD_FS_FAULT_WHILE=<filler>`` the disk is "full" while the filler file exists. The tmpfs tests
fill a real small filesystem instead; they need root and ``mount`` and skip with the reason otherwise.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from datetime import datetime
from collections import Counter
from pathlib import Path

import pytest

from batchd import fs
from batchd.fs import EXIT_STORAGE, STEPS
from batchd.testing import Emulator, Workspace
from invariants import Dropped, assert_invariants
from test_daemon import SENTIMENT, TRANSLATE
from test_recovery import creates_by_display_name

#: translate: 4 requests, sentiment: 3; at 2 a chunk, 4 remote batches.
CHUNKS = 4
#: The steps' files are synced together (one syncfs before a commit) only where syncfs reports errors.
WITH_SYNCFS = pytest.mark.skipif(not fs.SyncGroup.available(tempfile.gettempdir()), reason="syncfs reports errors on Linux 5.8 and later")


def steps() -> list:
    """STEPS as test parameters, the ``sync`` step's marked to run only where the daemon syncs together."""
    return [pytest.param(step, marks=WITH_SYNCFS) if step == "sync" else step for step in STEPS]


#: Steps whose disk-full failure is retried (a journal commit's is fatal instead).
RETRIED_STEPS = [step for step in steps() if step != "journal"]


def service(emulator: Emulator) -> dict[str, str]:
    """provider = "gemini" pointed at the test's emulator, so the creates it saw can be counted."""
    return {"BATCHD_PROVIDER": "gemini", "GEMINI_API_KEY": emulator.api_key,
            "GOOGLE_GEMINI_BASE_URL": emulator.base_url}


def drop_both(workspace: Workspace) -> list[Dropped]:
    return [Dropped.of(workspace.drop("translate.toml", TRANSLATE)),
            Dropped.of(workspace.drop("sentiment.toml", SENTIMENT))]


def assert_delivered_once(workspace: Workspace, emulator: Emulator, dropped: list[Dropped]) -> None:
    remote = list(emulator.client().batches.list(config={"page_size": 50}))
    assert_invariants(workspace, dropped, remote)
    creates = creates_by_display_name(emulator)
    assert len(creates) == CHUNKS and all(count == 1 for count in creates.values()), creates
    states = {name: folder.state for name, folder in workspace.outbox_folders().items()}
    assert states == {"translate": "succeeded", "sentiment": "succeeded"}, states


def disk_full_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "disk full: writing" in line]


@pytest.mark.parametrize("step", RETRIED_STEPS)
def test_a_full_disk_at_each_step_is_retried_and_delivered_once_there_is_room(
        workspace: Workspace, emulator: Emulator, step: str):
    """ENOSPC at ``step``: the daemon keeps running, says which file and errno, keeps the jobs in
    their state (none fails, none reaches the outbox half written) and retries with backoff; once
    the filler is gone both jobs are delivered whole, with exactly one create per chunk."""
    workspace.configure(chunk_max_requests=2)
    dropped = drop_both(workspace)
    filler = workspace.root / "filler"
    filler.write_text("the disk is full while this file exists")
    daemon = workspace.start("run", BATCHD_FS_FAULT=f"{step}:ENOSPC", BATCHD_FS_FAULT_WHILE=str(filler),
                             **service(emulator))
    try:
        # Two failures: the step was retried after its pause and found the disk still full.
        workspace.wait_for(lambda: len(disk_full_lines(daemon.output())) >= 2, 120, "two disk-full retries")
        assert daemon.poll() is None, daemon.output()[-3000:]
        line = disk_full_lines(daemon.output())[0]
        assert "ENOSPC: No space left on device" in line and "retried in" in line, line
        assert str(workspace.root) in line, f"the log line names no path: {line}"
        assert not workspace.outbox_folders(), "a job reached the outbox while its step failed"
        assert not [p for p in workspace.outbox.rglob("*")], "something was written into the outbox"
        jobs = workspace.status()
        assert all(job["state"] != "done" for job in jobs), jobs
        if step == "claim":
            assert sorted(p.name for p in workspace.inbox.iterdir()) == ["sentiment.toml", "translate.toml"]
        assert "Traceback" not in daemon.output()

        filler.unlink()
        workspace.wait_for(lambda: len(workspace.outbox_folders()) == 2, 120, "both jobs delivered")
        assert daemon.stop() == 0, daemon.output()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert "writes go through again: disk space is back" in daemon.output()
    assert_delivered_once(workspace, emulator, dropped)


@pytest.mark.parametrize("step,error", [(step, "EIO") for step in STEPS if step != "sync"] + [("journal", "ENOSPC")]
                         + [(step, "EROFS") for step in STEPS if step != "sync"]
                         + [pytest.param("sync", error, marks=WITH_SYNCFS) for error in ("EIO", "EROFS")])
def test_a_failed_fsync_or_commit_exits_74_and_a_restart_delivers_once(
        workspace: Workspace, emulator: Emulator, step: str, error: str):
    """EIO at ``step``'s fsync, a journal commit refused for a full disk, or a filesystem turned
    read-only under ``step``'s writes: the step is not marked done, the daemon says why and exits 74
    (EX_IOERR) for the service manager to restart it, never with a job failed for it; the restart
    resumes from the journal and delivers each manifest once, one create per chunk."""
    workspace.configure(chunk_max_requests=2)
    dropped = drop_both(workspace)
    failed = workspace.start("run", BATCHD_FS_FAULT=f"{step}:{error}", **service(emulator))
    try:
        code = failed.wait(120)
    finally:
        if failed.poll() is None:
            failed.kill()
            failed.wait()
    output = failed.output()
    assert code == EXIT_STORAGE, output[-3000:]
    assert "storage failure:" in output and f"{error}: {os.strerror(getattr(errno, error))}" in output, output[-3000:]
    assert f"during step {step}" in output
    assert "Traceback" not in output, output[-3000:]
    if error == "EROFS":
        assert "batchd cannot write there: make the filesystem writable" in output
    if step != "journal":
        assert not workspace.outbox_folders() or step == "publish", "delivered although a step failed"

    restarted = workspace.batchd("run", "--once", **service(emulator))
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert_delivered_once(workspace, emulator, dropped)


@WITH_SYNCFS
def test_with_group_sync_off_every_file_is_synced_alone_and_no_syncfs_is_made(workspace: Workspace,
                                                                              emulator: Emulator):
    """``group_sync = false``: the fault that fails the steps' syncfs (above: exit 74) is never met, since
    each file and folder is fsynced where it is written; both jobs are delivered once."""
    workspace.configure(chunk_max_requests=2, group_sync=False)
    dropped = drop_both(workspace)
    run = workspace.batchd("run", "--once", BATCHD_FS_FAULT="sync:EIO", **service(emulator))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_delivered_once(workspace, emulator, dropped)


def test_below_the_free_space_floor_nothing_new_is_claimed(workspace: Workspace, emulator: Emulator):
    """min_free_mb above what the disk has: --once leaves the manifests in the inbox, says why and
    exits 75 (run again later); doctor reports it; with room again they are delivered."""
    workspace.configure(chunk_max_requests=2, min_free_mb=1e12)  # an exabyte: no test machine has that much free
    dropped = drop_both(workspace)

    stopped = workspace.batchd("run", "--once", **service(emulator))

    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "below min_free_mb = 1e+12: not claiming new manifests" in stopped.stderr
    assert "2 manifest(s) left in the inbox unclaimed" in stopped.stderr
    assert sorted(p.name for p in workspace.inbox.iterdir()) == ["sentiment.toml", "translate.toml"]
    assert workspace.status() == []
    assert creates_by_display_name(emulator) == {}
    doctor = workspace.batchd("doctor")
    assert doctor.returncode == 1
    assert "free space" in doctor.stdout and "min_free_mb" in doctor.stdout, doctor.stdout

    delivered = workspace.batchd("run", "--once", BATCHD_MIN_FREE_MB="0", **service(emulator))
    assert delivered.returncode == 0, delivered.stderr[-3000:]
    assert_delivered_once(workspace, emulator, dropped)


# --- a real small filesystem -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MB tmpfs, unmounted after the test whatever happens; the test is skipped where mounting is
    not permitted (not root, a container without CAP_SYS_ADMIN, no mount binary)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, PermissionError) as error:
        pytest.skip(f"cannot run mount ({error}); the BATCHD_FS_FAULT tests cover the same steps")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip() or mounted.returncode}); "
                    "the BATCHD_FS_FAULT tests cover the same steps")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30)
        if os.path.ismount(mount_point):
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def workspace_on(disk: Path, root: Path, **settings) -> Workspace:
    """A workspace whose inbox, outbox and state live on ``disk`` (its config and logs do not, so the
    logs stay readable when the disk is full)."""
    root.mkdir()
    for name in ("inbox", "outbox", "state"):
        (disk / name).mkdir()
        (root / name).symlink_to(disk / name)
    return Workspace.create(root, **settings)


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until ``disk`` is full (but for about ``leave_bytes``); returns it."""
    filler = disk / "filler"
    block = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave_bytes + len(block):
            os.write(fd, block)
        if not leave_bytes:
            for size in (4096, 512, 1):
                try:
                    while True:
                        os.write(fd, block[:size])
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def test_on_a_real_full_disk_the_free_space_floor_stops_claims_until_there_is_room(
        small_disk: Path, tmp_path: Path, emulator: Emulator):
    """A tmpfs with less than min_free_mb left: the daemon says so and leaves the manifest in the
    inbox; once the filler is deleted it claims and delivers it."""
    workspace = workspace_on(small_disk, tmp_path / "ws", min_free_mb=4)
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE))]
    filler = fill(small_disk, leave_bytes=2_000_000)
    daemon = workspace.start("run", **service(emulator))
    try:
        workspace.wait_for(lambda: "not claiming new manifests" in daemon.output(), 60, "the floor's warning")
        assert [p.name for p in workspace.inbox.iterdir()] == ["translate.toml"]
        filler.unlink()
        workspace.wait_for_delivery("translate", 120)
        assert daemon.stop() == 0, daemon.output()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert "claiming new manifests again" in daemon.output()
    remote = list(emulator.client().batches.list())
    assert_invariants(workspace, dropped, remote)
    assert all(count == 1 for count in creates_by_display_name(emulator).values())


@pytest.mark.slow  # an edge case; the slow step runs it
def test_on_a_real_full_disk_jobs_in_flight_are_delivered_once_space_frees(small_disk: Path, tmp_path: Path):
    """The disk fills up completely while the remote batches run. Whatever step meets it (storing
    results, writing the outbox, a journal commit), no job fails, none is half delivered, and the
    daemon either backs off or exits 74 and is restarted, as systemd would; once the filler is deleted
    everything is delivered once, with one create per chunk."""
    workspace = workspace_on(small_disk, tmp_path / "ws", min_free_mb=0, chunk_max_requests=2)
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE)),
               Dropped.of(workspace.drop("sentiment.toml", SENTIMENT))]
    # Batches that run a few seconds, so that the disk is full before their results come back.
    with Emulator(tmp_path / "slow-emulator", job_seconds=4) as emulator:
        delivered_on_a_full_disk(workspace, emulator, dropped, small_disk)


def delivered_on_a_full_disk(workspace: Workspace, emulator: Emulator, dropped: list[Dropped], disk: Path) -> None:
    emulator_env = service(emulator)
    exits: list[int] = []
    daemon = workspace.start("run", **emulator_env)
    try:
        workspace.wait_for(lambda: sum(creates_by_display_name(emulator).values()) == CHUNKS, 60, "every create")
        filler = fill(disk)
        # It meets the full disk when the results come back (or at its next journal commit).
        workspace.wait_for(lambda: disk_full_lines(daemon.output()) or daemon.poll() is not None, 120,
                           "the full disk noticed")
        assert not workspace.outbox_folders()
        filler.unlink()
        while len(workspace.outbox_folders()) < 2:
            if daemon.poll() is not None:  # the service manager's Restart=on-failure
                exits.append(daemon.returncode)
                assert daemon.returncode == EXIT_STORAGE, daemon.output()[-3000:]
                daemon = workspace.start("run", **emulator_env)
            workspace.wait_for(lambda: len(workspace.outbox_folders()) == 2 or daemon.poll() is not None, 120,
                               "delivery or an exit")
        assert daemon.stop() == 0, daemon.output()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    logs = "\n".join(path.read_text() for path in workspace.root.glob("daemon-*.log"))
    assert "Traceback" not in logs, logs[-4000:]
    remote = list(emulator.client().batches.list())
    assert_invariants(workspace, dropped, remote)
    creates = creates_by_display_name(emulator)
    assert len(creates) == CHUNKS and all(count == 1 for count in creates.values()), (creates, exits)
    assert Counter(folder.state for folder in workspace.outbox_folders().values()) == {"succeeded": 2}


def test_a_read_only_state_dir_at_start_is_one_clear_line_and_exit_74(small_disk: Path, tmp_path: Path):
    """A filesystem mounted read-only (or remounted so by the kernel after disk errors): batchd says
    what to do and exits 74, every time the service manager restarts it, without a traceback; once
    the filesystem is writable again the manifest waiting in the inbox is delivered."""
    workspace = workspace_on(small_disk, tmp_path / "ws", min_free_mb=0)
    workspace.drop("translate.toml", TRANSLATE)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    try:
        for _ in range(2):
            refused = workspace.batchd("run", "--once")
            assert refused.returncode == EXIT_STORAGE, refused.stderr[-3000:]
            assert "Read-only file system" in refused.stderr and "make the filesystem writable" in refused.stderr
            assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) <= 3, refused.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True, timeout=30)

    delivered = workspace.batchd("run", "--once")

    assert delivered.returncode == 0, delivered.stderr[-3000:]
    assert workspace.outbox_folder("translate").state == "succeeded"


@pytest.mark.slow
def test_a_job_that_finds_no_room_waits_longer_each_time_while_other_writes_go_through(
        workspace: Workspace, emulator: Emulator):
    """The outbox folder of a job cannot be written (too big for the room left) while the daemon's
    other work goes on: the job is retried after 1, 2, 4 … s, each failure one log line, instead of
    every second or two forever; once there is room it is delivered."""
    workspace.configure(chunk_max_requests=2)
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE))]
    filler = workspace.root / "filler"
    filler.write_text("the outbox has no room while this file exists")
    daemon = workspace.start("run", BATCHD_FS_FAULT="outbox:ENOSPC", BATCHD_FS_FAULT_WHILE=str(filler),
                             **service(emulator))
    try:
        workspace.wait_for(lambda: len(disk_full_lines(daemon.output())) >= 4, 120, "four disk-full retries")
        stamps = [datetime.fromisoformat(line.split()[0].removeprefix("ts=").replace("Z", "+00:00"))
                  for line in disk_full_lines(daemon.output())[:4]]
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(stamps, stamps[1:])]
        assert gaps[2] > 3.0 and gaps[2] > gaps[0] * 2, f"the waits grow: {gaps}"
        filler.unlink()
        workspace.wait_for(lambda: workspace.outbox_folders(), 120, "the job delivered")
        assert daemon.stop() == 0, daemon.output()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert workspace.outbox_folder("translate").state == "succeeded"
    assert_invariants(workspace, dropped, list(emulator.client().batches.list(config={"page_size": 50})))
