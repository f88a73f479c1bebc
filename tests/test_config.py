"""Settings layering: defaults < config file < BATCHD_* environment < command-line flags."""

import os
from pathlib import Path

import pytest

from batchd.config import ConfigError, Settings, load_settings
from batchd.testing import Workspace

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.toml"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No BATCHD_* or API-key variables from the caller, and an empty working directory."""
    import os

    for name in list(os.environ):
        if name.startswith("BATCHD_") or name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_config(folder: Path, text: str, name: str = "config.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_defaults_without_a_config_file(tmp_path):
    settings = load_settings()
    assert settings.config_file is None
    assert settings.provider == "emulator", "the embedded emulator is the default, as in the shipped config"
    assert settings.model == "gemini-2.5-flash"
    assert settings.api_version == "v1beta"
    assert settings.inbox == tmp_path / "inbox"
    assert settings.emulator.state_dir == tmp_path / "state" / "emulator"
    assert 0 < settings.inline_max_bytes < 20 * 1024 * 1024


def test_layers_defaults_file_env_cli(tmp_path, monkeypatch):
    config = write_config(tmp_path / "etc", "poll_interval = 2.0\nsettle_seconds = 2.0\nrescan_seconds = 2.0\n")
    monkeypatch.setenv("BATCHD_SETTLE_SECONDS", "3.0")
    monkeypatch.setenv("BATCHD_RESCAN_SECONDS", "3.0")
    settings = load_settings(config, rescan_seconds=4.0, poll_max_interval=None)
    assert settings.poll_max_interval == Settings.model_fields["poll_max_interval"].default  # default
    assert settings.poll_interval == 2.0  # file
    assert settings.settle_seconds == 3.0  # environment beats file
    assert settings.rescan_seconds == 4.0  # command line beats environment


@pytest.mark.parametrize("value", ["variations", "variations, sentiment", '["variations", "sentiment"]'])
def test_a_list_setting_from_the_environment_is_a_comma_list_or_json(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHD_DISABLED_PLUGINS", value)
    expected = ["variations"] if value == "variations" else ["variations", "sentiment"]
    assert load_settings().disabled_plugins == expected


def test_a_nested_list_setting_from_the_environment_may_be_a_comma_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHD_NOTIFY__WEBHOOK__URLS", "http://127.0.0.1:9/a, http://127.0.0.1:9/b")
    urls = load_settings().notify.webhook.urls
    assert [url.get_secret_value() for url in urls] == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]


def test_broken_json_in_the_environment_is_a_config_error_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHD_DISABLED_PLUGINS", "[oops")
    with pytest.raises(ConfigError, match="disabled_plugins"):
        load_settings()


def test_nested_table_layers_merge(tmp_path, monkeypatch):
    config = write_config(tmp_path, "[emulator]\njob_seconds = 0.5\n")
    monkeypatch.setenv("BATCHD_EMULATOR__FAULTS", '["a-fault"]')
    settings = load_settings(config)
    assert settings.emulator.job_seconds == 0.5
    assert settings.emulator.faults == ["a-fault"]
    assert load_settings(config, emulator={"job_seconds": 0.2}).emulator.job_seconds == 0.2


def test_relative_paths_in_file_resolve_against_its_folder(tmp_path):
    folder = tmp_path / "srv" / "batchd"
    config = write_config(folder, 'inbox = "in"\nstate_dir = "../var"\nplugins_dir = "plugins.d"\n')
    settings = load_settings(config)
    assert settings.inbox == folder / "in"
    assert settings.state_dir == tmp_path / "srv" / "var"
    assert settings.plugins_dir == folder / "plugins.d"
    assert settings.outbox == tmp_path / "outbox"  # default: relative to the working directory
    assert settings.emulator.state_dir == tmp_path / "srv" / "var" / "emulator"


def test_relative_paths_from_env_and_cli_resolve_against_cwd(tmp_path, monkeypatch):
    config = write_config(tmp_path / "etc", 'inbox = "in"\n')
    monkeypatch.setenv("BATCHD_INBOX", "env-inbox")
    assert load_settings(config).inbox == tmp_path / "env-inbox"
    assert load_settings(config, inbox=Path("cli-inbox")).inbox == tmp_path / "cli-inbox"


def test_config_file_from_env_then_cwd(tmp_path, monkeypatch):
    write_config(tmp_path, 'model = "from-cwd"\n')
    assert load_settings().model == "from-cwd"
    other = write_config(tmp_path / "other", 'model = "from-env"\n')
    monkeypatch.setenv("BATCHD_CONFIG", str(other))
    settings = load_settings()
    assert settings.model == "from-env"
    assert settings.config_file == other


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "text, key",
    [
        ("inbx = 'x'\n", "'inbx'"),
        ("[emulator]\njob_second = 1\n", "'emulator.job_second'"),
    ],
)
def test_unknown_keys_name_the_key_and_file(tmp_path, text, key):
    config = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert key in str(error.value)
    assert str(config) in str(error.value)


def test_invalid_values_name_the_key(tmp_path):
    config = write_config(tmp_path, 'provider = "openai"\n')
    with pytest.raises(ConfigError, match="provider"):
        load_settings(config)
    with pytest.raises(ConfigError, match="poll_interval"):
        load_settings(poll_interval=0)


def test_toml_syntax_error_names_the_line(tmp_path):
    config = write_config(tmp_path, 'model = "x"\ninbox = \n')
    with pytest.raises(ConfigError, match="line 2"):
        load_settings(config)


def test_a_config_file_of_any_bytes_is_a_config_error_not_a_crash(tmp_path):
    config = write_config(tmp_path, "")
    config.write_bytes(b'inbox = "in\xffbox"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(config)
    config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deep"):
        load_settings(config)


def test_unknown_cli_override_is_an_error():
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_settings(no_such_setting=1)


def test_missing_api_key_names_both_variables():
    settings = load_settings(provider="gemini")
    with pytest.raises(ConfigError) as error:
        settings.gemini_api_key()
    assert "GEMINI_API_KEY" in str(error.value) and "GOOGLE_API_KEY" in str(error.value)


def test_api_key_precedence_follows_the_sdk(monkeypatch):
    settings = load_settings()
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-key")
    assert settings.gemini_api_key() == "gemini-key"
    monkeypatch.setenv("GOOGLE_API_KEY", "google-key")
    assert settings.gemini_api_key() == "google-key"


def test_redacted_dict_masks_secrets_by_type_and_shows_token_settings(monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", "sekrit-api-key")
    monkeypatch.setenv("BATCHD_NOTIFY__WEBHOOK__SECRET", "whsec-not-shown")
    monkeypatch.setenv("BATCHD_NOTIFY__EMAIL__URLS", '["mailtos://me:pw@example.com"]')
    monkeypatch.setenv("BATCHD_NOTIFY__WEBHOOK__URLS", '["https://hooks.example.com/T0/B0/xoxb-hook-token"]')
    monkeypatch.setenv("BATCHD_COST__DEFAULT_OUTPUT_TOKENS", "321")
    settings = load_settings()
    settings.gemini_api_key()  # registers the key, as the daemon does
    dump = settings.redacted_dict()
    assert "sekrit-api-key" not in repr(dump)
    assert "whsec-not-shown" not in repr(dump) and "pw@example" not in repr(dump)
    assert dump["provider"] == "emulator"
    assert dump["notify"]["webhook"]["secret"] == "***"
    assert dump["notify"]["email"]["urls"] == ["***"]
    assert dump["notify"]["webhook"]["urls"] == ["***"] and "xoxb-hook-token" not in repr(dump)
    # Settings whose names merely contain "token" are not secrets: they are shown as they are.
    assert dump["cost"]["default_output_tokens"] == 321
    assert dump["cost"]["count_tokens"] == settings.cost.count_tokens
    assert dump["cost"]["count_tokens_sample"] == settings.cost.count_tokens_sample
    assert isinstance(dump["inbox"], str), "JSON-compatible: paths are strings"


def test_shipped_config_loads(tmp_path):
    settings = load_settings(REPO_CONFIG)
    assert settings.provider == "emulator"
    assert load_settings().provider == settings.provider, "one default: the built-in one is the shipped config's"
    assert settings.inbox == REPO_CONFIG.parent / "inbox"
    assert settings.state_dir == REPO_CONFIG.parent / "state"


def test_the_daemon_takes_a_comma_list_from_the_environment_and_refuses_a_broken_one_in_one_line(workspace):
    """BATCHD_DISABLED_PLUGINS=variations printed a 60-line pydantic traceback and exited 1 (a restart
    loop under systemd): a comma list is a list; broken JSON is one line naming the setting, exit 78."""
    workspace.drop("sentiment.toml", 'task = "sentiment"\ntexts = ["Fine."]\n')
    workspace.drop("variations.toml", 'task = "variations"\nprompt = "a name"\n')

    broken = workspace.batchd("run", "--once", BATCHD_DISABLED_PLUGINS='["variations"')
    assert broken.returncode == 78, broken.stderr  # EX_CONFIG: the service manager does not restart it
    assert "disabled_plugins" in broken.stderr and "Traceback" not in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1, broken.stderr

    ran = workspace.batchd("run", "--once", BATCHD_DISABLED_PLUGINS="variations, cost")
    assert ran.returncode == 1, ran.stderr[-3000:]  # the variations manifest names a task no plugin gives
    delivered = workspace.delivered()
    assert delivered["sentiment"]["state"] == "succeeded"
    assert delivered["variations"]["state"] == "rejected" and "unknown task" in delivered["variations"]["error"]["message"]


def test_a_current_directory_removed_under_the_shell_is_a_config_error_unless_every_path_is_absolute(tmp_path):
    """`batchd status` typed in a folder deleted meanwhile: relative paths (the defaults', the command line's)
    have nothing to be taken from. One line and exit 78, not a traceback; a config given by an absolute path
    (its folders are taken from its own folder) works from there."""
    import subprocess
    import sys

    ws = Workspace.create(tmp_path / "ws")
    gone = tmp_path / "gone"
    gone.mkdir()
    script = ("import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
              "from batchd.cli import main; sys.argv = ['batchd', *sys.argv[2:]]; main()")

    def batchd(*args: str) -> subprocess.CompletedProcess:
        env = {key: value for key, value in os.environ.items() if key != "BATCHD_CONFIG"}
        gone.mkdir(exist_ok=True)
        return subprocess.run([sys.executable, "-c", script, str(gone), *args], capture_output=True, text=True,
                              env=env, timeout=60)

    for args in (["status"], ["--config", "config.toml", "status"]):
        refused = batchd(*args)
        assert refused.returncode == 78, refused.stderr
        assert refused.stderr.startswith("Error: the current directory no longer exists"), refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    listed = batchd("--config", str(ws.config), "list")
    assert listed.returncode == 0, listed.stderr


@pytest.mark.parametrize(("days", "accepted"), [(0, True), (7, True), (90.5, True), (3, False), (-1, False)])
def test_forget_jobs_after_days_is_off_or_a_week_at_least(tmp_path, days, accepted):
    """Rows of a job name what may still show up for days after it is done (a stray batch of an unknown
    create, watched for about two days): forgetting sooner is refused, with why."""
    config = tmp_path / "config.toml"
    config.write_text(f"forget_jobs_after_days = {days}\n")
    if accepted:
        assert load_settings(config).forget_jobs_after_days == days
    else:
        with pytest.raises(ConfigError, match="forget_jobs_after_days"):
            load_settings(config)
