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
