"""Shared fixtures: batchd's own tests use the same ones plugin authors get from batchd.testing
(``emulator``, ``workspace``, ``daemon``), plus a fresh virtual environment for install tests."""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest_plugins = ["batchd.testing"]

REPO = Path(__file__).resolve().parent.parent


#: Crash and fault matrices: the default run takes a few combinations of each (every crash point is
#: still killed at least once), CI's slow step every combination. Test name -> the ids kept.
MATRIX_DEFAULTS = {
    # One crash point of each step (claim, create, poll, publish), alternating inline and file chunks.
    "test_kill_9_at_any_step_delivers_exactly_once": {
        "after-claim-inline", "after-create-inline", "while-polling-file", "after-publish-file"},
    "test_sigterm_at_each_crash_point_exits_0_and_a_restart_creates_nothing_extra": {"after-create"},
    "test_recovery_run_twice_is_idempotent": {"after-download"},
    "test_a_failed_fsync_or_commit_exits_74_and_a_restart_delivers_once": {"journal-EIO", "outbox-EROFS"},
    "test_a_full_disk_at_each_step_is_retried_and_delivered_once_there_is_room": {"requests"},
    "test_kill_9_around_a_cancel_ends_cancelled_with_every_remote_job_stopped": {"running-after-cancel"},
    "test_sigterm_around_a_cancel_exits_0_and_the_restart_finishes_the_cancel": {"after-cancel"},
    "test_sigterm_mid_job_exits_cleanly_and_a_restart_finishes_it": {"False"},
    "test_kill_9_while_resubmitting_leaves_one_live_remote_job_and_delivers_once": {"after-resubmit-create-file"},
    "test_a_stop_during_a_create_records_the_remote_job_before_exiting_0": {"sigterm"},
    "test_killed_around_a_create_the_restart_uploads_nothing_again_and_leaves_nothing": {"after-create"},
    "test_inline_batch_goes_pending_running_succeeded": {"v1beta"},
}


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seen: dict[str, set[str]] = {}
    for item in items:
        name = getattr(item, "originalname", "")
        if name in MATRIX_DEFAULTS:
            seen.setdefault(name, set()).add(item.callspec.id)
            if item.callspec.id not in MATRIX_DEFAULTS[name]:
                item.add_marker(pytest.mark.slow)
    for name, ids in seen.items():  # a renamed parameter must not quietly move a whole matrix to the slow step
        if len(ids) > len(MATRIX_DEFAULTS[name]) and (missing := MATRIX_DEFAULTS[name] - ids):
            raise pytest.UsageError(f"MATRIX_DEFAULTS keeps {sorted(missing)} of {name}, which has no such case")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Most tests start batchd (and its emulator) as new processes. Where PYTHONDONTWRITEBYTECODE is set,
    # as on many CI machines, each of them would compile batchd's sources again (a quarter of a second
    # of CPU per process); compiled once here, they are read from __pycache__ like any installed package.
    if not hasattr(session.config, "workerinput"):  # once, in the controller of a pytest-xdist run
        compileall.compile_dir(REPO / "batchd", quiet=1)


class FreshVenv:
    """A virtual environment outside the checkout that reuses this environment's dependencies.

    Nothing is downloaded: a ``.pth`` line puts this environment's site-packages after the venv's
    own. A plain path line does not run that directory's own ``.pth`` files, so the editable
    install of batchd in this environment stays out of the way; what is ``install``-ed in the venv
    is what its interpreter imports.
    """

    def __init__(self, root: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        self.python = root / "bin" / "python"
        self.env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        self.site = Path(self.run("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
        (self.site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def install(self, *sources: Path) -> None:
        """``pip install --no-deps SOURCES`` into the venv, offline when setuptools allows it."""
        env, build_options = dict(self.env), []
        if _can_build_wheels_offline():
            build_options, env["PIP_NO_INDEX"] = ["--no-build-isolation"], "1"
        # else pip fetches the build backend (once; later runs use pip's cache)
        install = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(self.python), "install", "--quiet", "--no-deps",
             *build_options, *map(str, sources)],
            env=env, cwd=self.python.parents[2], capture_output=True, text=True,
        )
        assert install.returncode == 0, install.stderr

    def run(self, *args: str, cwd: Path | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the venv's interpreter with ``args``."""
        return subprocess.run([str(self.python), *args], cwd=cwd, env=self.env, check=check,
                              capture_output=True, text=True, timeout=timeout)


def _can_build_wheels_offline() -> bool:
    """Whether this environment's setuptools builds wheels by itself (70.1+ has bdist_wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("setuptools")) >= Version("70.1")
    except PackageNotFoundError:
        return False


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """A copy of the checkout's sources (no venv, VCS or build state), to install from."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", ".plan", "state", "outbox", "build", "*.egg-info", "__pycache__",
                                      ".pytest_cache"),
    )
    return source


@pytest.fixture
def fresh_venv(tmp_path: Path) -> FreshVenv:
    return FreshVenv(tmp_path / "venv")
