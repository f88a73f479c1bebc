"""Daemon settings: defaults < config file < ``BATCHD_*`` environment < command-line flags.

The config file is TOML (``config.toml``), chosen by ``--config PATH``, else ``$BATCHD_CONFIG``,
else ``./config.toml`` when it exists. Relative paths written in the file resolve against the
file's folder, so a config and its inbox/outbox can move together; relative paths from the
environment or the command line resolve against the working directory. After loading, every
path setting is absolute.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from batchd.logs import redact_data, register_secret
from batchd.manifest import ManifestLimits

CONFIG_ENV_VAR = "BATCHD_CONFIG"
#: Environment variables that hold secrets batchd reads (the SDK's API key variables).
SECRET_ENV_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
DEFAULT_CONFIG_NAME = "config.toml"

#: The Gemini API accepts inline batch requests up to 20 MB; keep a margin for the JSON envelope.
INLINE_LIMIT_BYTES = 20 * 1024 * 1024
INLINE_MARGIN_BYTES = 1024 * 1024



def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or a bare ``PORT`` (loopback) → (host, port)."""
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{value!r} is not HOST:PORT or PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range (0-65535)")
    return host, number


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConfigError(Exception):
    """The configuration is unusable; the message says which file/key/variable and why."""


class RetrySettings(BaseModel):
    """``[retry]``: how a call to the Gemini API that failed for a passing reason (429, 5xx, a dropped
    connection) is tried again: by the SDK for single calls, by batchd for whole uploads and downloads."""

    model_config = ConfigDict(extra="forbid")

    # Bounded: an upload, a download or a token count waits through them in its worker thread.
    attempts: int = Field(5, ge=1, le=10, description="Tries of one call, the first included (at most 10).")
    initial_seconds: float = Field(
        1.0, gt=0, description="Wait before the second try; it doubles (plus up to this much jitter) each time.")
    max_seconds: float = Field(60.0, gt=0, le=60, description="Longest wait between two tries (at most 60).")


class EmulatorSettings(BaseModel):
    """The ``[emulator]`` table: the embedded emulator started by ``provider = "emulator"``."""

    model_config = ConfigDict(extra="forbid")

    job_seconds: float = Field(2.0, ge=0, description="How long an emulated batch job runs.")
    concurrent_batches: int = Field(
        100, ge=0, description="Batch jobs pending or running at once, as Google's limit per project; a create"
                               " beyond it is refused with 429 RESOURCE_EXHAUSTED. 0 = no limit.")
    faults: list[str] = Field(
        default_factory=list, description="Fault specs injected into every request (see docs/emulator.md)."
    )
    state_dir: Path | None = Field(None, description="Emulator storage; defaults to <state_dir>/emulator.")


#: Standard (interactive) prices in USD per million tokens, text input, from Google's pricing page
#: (ai.google.dev/gemini-api/docs/pricing, late 2025); the batch discount applies on top. Output
#: prices include thinking tokens. Prompts above 200k tokens cost more on the Pro models; that tier
#: is not modelled. ``[cost.prices]`` in config.toml overrides or extends this table.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gemini-3-pro-preview": {"input": 2.00, "output": 12.00, "cached_input": 0.20},
    "gemini-3-flash-preview": {"input": 0.50, "output": 3.00, "cached_input": 0.05},
    "gemini-2.5-pro": {"input": 1.25, "output": 10.00, "cached_input": 0.125},
    "gemini-2.5-flash": {"input": 0.30, "output": 2.50, "cached_input": 0.03},
    "gemini-2.5-flash-lite": {"input": 0.10, "output": 0.40, "cached_input": 0.01},
    "gemini-2.0-flash": {"input": 0.10, "output": 0.40, "cached_input": 0.025},
    "gemini-2.0-flash-lite": {"input": 0.075, "output": 0.30},
    "gemini-embedding-001": {"input": 0.15, "output": 0.0},
}

#: The kinds of job events, in the order a job meets them (see docs/plugins.md, job_event).
EventKind = Literal["accepted", "rejected", "held", "submitted", "progress", "expired",
                    "succeeded", "partial", "plugin_failed", "failed", "cancelled"]


class ModelPrice(BaseModel):
    """One model's standard price, USD (or ``cost.currency``) per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, description="Per million prompt tokens.")
    output: float = Field(ge=0, description="Per million output tokens (thinking tokens included).")
    cached_input: float | None = Field(
        None, ge=0, description="Per million prompt tokens served from a context cache (billed as for"
                                " interactive traffic, without the batch discount); unset: as other prompt tokens.")


class CostSettings(BaseModel):
    """The ``[cost]`` table: the price table and budgets used by the ``cost`` plugin."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field("USD", min_length=1, description="Currency of prices and budgets.")
    batch_discount: float = Field(0.5, ge=0, le=1, description="Fraction taken off standard prices for batch jobs.")
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Prices per model name, over the built-in table (DEFAULT_PRICES)."
    )
    job_budget: float | None = Field(None, ge=0, description="Hold a job whose estimate exceeds this.")
    daily_budget: float | None = Field(
        None, ge=0, description="Hold a job that would take the last 24 hours' spend above this."
    )
    count_tokens: bool = Field(True, description="Calibrate the estimate with the provider's countTokens.")
    count_tokens_sample: int = Field(20, ge=1, le=1000, description="Prompts sent to countTokens per job.")
    default_output_tokens: int = Field(
        256, ge=0, description="Output tokens assumed per request that sets no max_output_tokens."
    )

    def price_for(self, model: str) -> tuple[str, ModelPrice] | None:
        """The price entry for ``model``: an exact name, else the longest name it starts with."""
        model = model.removeprefix("models/")
        table = {name: ModelPrice(**price) for name, price in DEFAULT_PRICES.items()} | self.prices
        if model in table:
            return model, table[model]
        prefixes = [name for name in table if model.startswith(name)]
        if not prefixes:
            return None
        name = max(prefixes, key=len)
        return name, table[name]


class LogNotifySettings(BaseModel):
    """``[notify.log]``: the ``log`` plugin, one structured line per event."""

    model_config = ConfigDict(extra="forbid")

    events: list[EventKind] = Field(default_factory=list, description="Kinds to log; empty: all.")


class _SendsToUrls:
    """What the ``webhook`` and ``email`` sections share: ``urls`` to send to, the ``events`` kinds sent.

    (No annotations here: pydantic would take them for fields of the sections.)
    """

    def event_kinds(self) -> tuple[str, ...] | list[str] | None:
        """The ``job_event_kinds`` answer: none without a URL, else the ``events`` kinds (``None``: all)."""
        if not self.urls:
            return ()
        return self.events or None

    def wants(self, kind: str) -> bool:
        """Checked at delivery too: an event committed before the config changed may still come."""
        return bool(self.urls) and (not self.events or kind in self.events)


class WebhookSettings(_SendsToUrls, BaseModel):
    """``[notify.webhook]``: the ``webhook`` plugin, signed JSON POSTs."""

    model_config = ConfigDict(extra="forbid")

    urls: list[SecretStr] = Field(
        default_factory=list,
        description="Endpoints each event is POSTed to (kept secret: chat webhook URLs carry their token).",
    )
    secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of the X-Batchd-Signature header; unset: unsigned."
    )
    events: list[EventKind] = Field(default_factory=list, description="Kinds to send; empty: all.")
    timeout_seconds: float = Field(10.0, gt=0, description="HTTP timeout of one POST.")


class EmailSettings(_SendsToUrls, BaseModel):
    """``[notify.email]``: the ``email`` plugin, through apprise (mailto://, slack://, ntfy://, ...)."""

    model_config = ConfigDict(extra="forbid")

    urls: list[SecretStr] = Field(
        default_factory=list, description="Apprise URLs; they hold credentials, so they are never shown."
    )
    events: list[EventKind] = Field(
        default_factory=lambda: ["held", "succeeded", "partial", "plugin_failed", "failed", "cancelled", "rejected"],
        description="Kinds to send; empty: all.",
    )


class NotifySettings(BaseModel):
    """``[notify]``: how events are delivered to notification plugins, and their own tables."""

    model_config = ConfigDict(extra="forbid")

    timeout_seconds: float = Field(30.0, gt=0, description="A plugin call longer than this counts as failed.")
    max_attempts: int = Field(10, ge=1, description="Attempts per event and plugin before giving up.")
    retry_initial_seconds: float = Field(2.0, gt=0, description="First wait before retrying a failed delivery.")
    retry_max_seconds: float = Field(600.0, gt=0, description="The wait doubles up to this.")
    once_drain_seconds: float = Field(
        30.0, ge=0, description="run --once waits this long at most for undelivered events before exiting."
    )
    keep_days: float = Field(
        30.0, gt=0, description="Delivered (or given up) events are kept in the journal this long."
    )
    progress_seconds: float = Field(
        60.0, ge=0, description="At most one progress event per job this often, as its remote counts move."
    )
    log: LogNotifySettings = Field(default_factory=LogNotifySettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    email: EmailSettings = Field(default_factory=EmailSettings)


class Settings(BaseSettings):
    """All daemon settings. Build with :func:`load_settings`, which applies the layering."""

    model_config = SettingsConfigDict(
        env_prefix="BATCHD_",
        env_nested_delimiter="__",  # BATCHD_EMULATOR__JOB_SECONDS=0.2
        extra="forbid",
        validate_default=True,
    )

    # Folders
    inbox: Path = Field(Path("inbox"), description="Where job manifests are dropped.")
    outbox: Path = Field(Path("outbox"), description="Where organized results are written.")
    state_dir: Path = Field(Path("state"), description="Journal, claimed jobs and downloads.")
    min_free_mb: float = Field(
        100.0,
        ge=0,
        description="Below this many MB free on state_dir's filesystem (which inbox and outbox share) no new"
                    " manifest is claimed; jobs in flight go on, and the room left keeps journal commits and"
                    " deliveries going. 0 = no floor.",
    )
    forget_jobs_after_days: float = Field(
        0.0,
        ge=0,
        description="Jobs done (delivered or rejected) longer ago than this many days are forgotten by the journal"
                    " (their rows, events and status; /metrics keeps counting them, their outbox folders stay), so"
                    " it keeps the size of its recent history. A forgotten job's manifest dropped again runs again."
                    " 0 = keep every job; otherwise at least 7 (a remote batch can still show up days later).",
    )
    plugins_dir: Path | None = Field(None, description="Optional folder of one-off *.py task plugins.")
    disabled_plugins: list[str] = Field(
        default_factory=list,
        description="Plugins not to load, by entry-point name or plugins_dir file stem (see `batchd plugins`).",
    )

    # Backend
    provider: Literal["emulator", "gemini"] = Field(
        "emulator",
        description="'emulator' (the default) starts the embedded Gemini Batch API emulator on a free loopback"
                    " port: nothing leaves the machine, nothing is billed. 'gemini' calls the Gemini API, with the"
                    " key from GEMINI_API_KEY or GOOGLE_API_KEY.",
    )
    model: str = Field("gemini-2.5-flash", min_length=1, description="Model used when a manifest names none.")
    api_version: str = Field("v1beta", min_length=1, description="Gemini API version.")

    # Polling and file watching
    poll_interval: float = Field(5.0, gt=0, description="First wait (s) between job status polls.")
    poll_max_interval: float = Field(60.0, gt=0, description="Polling backs off up to this many seconds.")
    settle_seconds: float = Field(
        1.0, ge=0, description="A file written in place must stay unchanged this long before it is read. One"
                               " renamed into the inbox (as `batchd submit` does) is read at once where inotify"
                               " reports the rename (Linux, watch_backend 'auto' or 'inotify'); with 'polling'"
                               " or 'none' every file waits.")
    incomplete_grace_seconds: float = Field(
        30.0, ge=0, description="An unparseable manifest is rejected once unchanged this long (it may still be"
                                " being written). `run --once` rejects it at once: what it takes is complete."
    )
    rescan_seconds: float = Field(30.0, gt=0, description="Full inbox rescan period (backs up the watcher).")
    watch_backend: Literal["auto", "inotify", "polling", "none"] = Field(
        "auto",
        description="How the inbox is watched: the platform's native events, inotify, polling (NFS/CIFS),"
                    " or none (the periodic rescan alone).",
    )
    temp_max_age_seconds: float = Field(
        36 * 3600.0,
        gt=0,
        description="Producer temp files left in the inbox (*.tmp, *.part, hidden or not)"
                    " are removed once this old (by mtime).",
    )

    # Submission and sizing
    max_concurrent_submissions: int = Field(
        4, ge=1, description="Uploads/creates in flight at once; as many result downloads run beside them.")
    max_concurrent_uploads: int = Field(
        2, ge=1, description="Of those, request-file uploads at once (each holds a 2 MiB part of its file in"
                             " memory); the other chunks wait their turn, creates and inline chunks go on.")
    max_remote_batches: int = Field(
        100, ge=0, description="Remote batch jobs pending or running at once (the Gemini API runs 100 per project"
                               " and refuses more creates with 429); further chunks wait their turn, oldest job"
                               " first. 0 = no limit.")
    max_concurrent_builds: int = Field(
        4, ge=1, description="Jobs whose requests are built (or read for a cost estimate) at once; the others"
                             " wait their turn in the journal, oldest first.")
    max_concurrent_writes: int = Field(
        8, ge=1, description="Jobs whose result files are written at once.")
    one_cpu: bool = Field(
        True, description="Run the daemon's threads on one CPU (the one it starts on). They take turns on one"
                          " GIL whatever the number of CPUs, and handing it from one CPU to another cost a"
                          " quarter of the daemon's CPU time under load. The embedded emulator keeps every CPU.")
    group_sync: bool = Field(
        True, description="Make the files the steps write (chunks, results, outbox folders) durable together:"
                          " one syncfs of the state dir's filesystem before the journal commit that records them,"
                          " instead of an fsync each (a small job's took a dozen). It also writes what other"
                          " programs left unwritten on that filesystem: false for one shared with heavy writers."
                          " On ext4, xfs, btrfs, f2fs or tmpfs under Linux 5.8 and later; elsewhere an fsync each"
                          " (batchd doctor says which).")
    chunk_max_requests: int = Field(50_000, ge=1, description="Requests per remote batch job at most.")
    chunk_max_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Size of one batch's JSONL input at most."
    )
    inline_max_bytes: int = Field(
        INLINE_LIMIT_BYTES - INLINE_MARGIN_BYTES,
        ge=0,
        description="Chunks up to this size are sent inline; 0 always uploads a file.",
    )
    inline_max_requests: int = Field(1000, ge=0, description="Chunks with more requests are uploaded.")
    pack_jobs_below: int = Field(
        100, ge=0, description="Jobs of fewer requests than this (one inline chunk, a generate task) share remote"
                               " batches: those waiting for the pool leave together, up to inline_max_requests"
                               " requests a batch, so a burst of small manifests is a few batches, not thousands."
                               " 0 or 1 = every job gets its own.")
    submit_grace_seconds: float = Field(
        120.0,
        ge=0,
        description="After a crash, wait this long for a submitted job to appear before resubmitting.",
    )
    stray_watch_seconds: float = Field(
        50 * 3600.0,
        gt=0,
        description="A display name whose create had an unknown outcome is watched in the remote job list"
                    " this long after its last create (a batch expires after 48 h), and a late remote job"
                    " under it is recorded and cancelled.",
    )
    resubmit_expired: int = Field(
        1,
        ge=0,
        description="Times a chunk whose remote batch expired (not finished by the service within 48 h, no"
                    " results) is submitted again before its requests end as 'expired' errors; 0: never.",
    )
    check_models: bool = Field(
        True,
        description="Check a manifest's model against the provider's model list (models.list, cached an hour"
                    " in state_dir/models.json; models.get for an id it does not list) at `batchd submit` and"
                    " before a job is priced: an unknown model is rejected before anything is sent, with the"
                    " close names it may mean. false: not checked (a create refuses it).",
    )

    plugin_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="A task plugin that keeps control this long in one step (requests() without yielding its next"
                    " request, organize() without taking a result or yielding an entry) is given up on: its job"
                    " fails with an error naming the plugin and the step.",
    )

    delete_request_files: bool = Field(
        True,
        description="Delete a batch's uploaded requests file from the Files API once the batch has ended and"
                    " its results are fetched (files count against the 20 GB per-project storage until they"
                    " expire after 48 h); false leaves them to expire.",
    )

    delete_finished_batches: bool = Field(
        True,
        description="Delete a job's remote batches once it is delivered (a shared batch once every job in it"
                    " has its results): the outbox has the results, and the project's batch list, which every"
                    " poll reads, stays short. False leaves them with the service. A delete that fails is"
                    " tried again, and those a stop or a crash left are deleted after the next start.",
    )

    media_inline_max_bytes: int = Field(
        64 * 1024, ge=0, le=4 * 2**20,
        description="A request's file (a folder input, file_column, a task's files) up to this size goes in the"
                    " request itself, base64 (inlineData): cheaper than an upload, a listing and a delete. Larger"
                    " ones are uploaded once through the Files API and referenced (fileData). 0: upload every file.",
    )
    media_keep_seconds: float = Field(
        3600.0, ge=0,
        description="An uploaded file no chunk needs any more is deleted from the Files API after this long, so"
                    " a job of the same files soon after reuses it instead of uploading it again (the service"
                    " keeps a file 48 h at most).",
    )
    cache: bool = Field(
        False,
        description="Answer a request identical to one answered successfully before (same model, contents, settings"
                    " and schema: its canonical request JSON) from the request cache in the state dir instead of"
                    " sending it, and keep every job's successful answers there; a manifest's `cache` overrides.")
    cache_max_entries: int = Field(
        100_000, ge=0, description="Answers the request cache keeps at most; the oldest stored are evicted.")
    cache_max_mb: float = Field(
        512.0, ge=0, description="Size of the answers the request cache keeps at most (MiB); the oldest stored are"
                                 " evicted.")
    # The HTTP server: dashboard, metrics, health, Gemini webhooks (docs/web.md)
    http: str | None = Field(
        None, description="Serve the dashboard, /metrics, /healthz, /readyz and /webhooks/gemini at HOST:PORT"
                          " (a bare PORT binds 127.0.0.1); unset: no HTTP server. `batchd run --http` sets it.")
    http_token: SecretStr | None = Field(
        None, description="Bearer token that enables the dashboard's cancel/approve/retry buttons (sent with each"
                          " POST); unset: the dashboard is read-only. Never shown.")
    webhook_public_url: str | None = Field(
        None, description="The URL at which the Gemini API reaches this daemon's /webhooks/gemini (https://… on"
                          " Google): sent with every batch as webhook_config.uris, with the job id and chunk in"
                          " user_metadata, and checked against per-job deliveries' JWT audience.")
    webhook_secret: SecretStr | None = Field(
        None, description="The whsec_ signing secret of a static webhook (`batchd webhooks register`), to verify its"
                          " deliveries (Standard Webhooks HMAC); also read from BATCHD_WEBHOOK_SECRET. Never shown.")
    webhook_jwks_url: str | None = Field(
        None, description="Where the keys of per-job webhooks' RS256 JWTs are published; unset: the provider's base"
                          " URL + /.well-known/jwks.json.")
    webhook_poll_interval: float = Field(
        600.0, gt=0, description="While webhooks are healthy (a verified delivery within the last"
                                 " webhook_healthy_seconds) polls wait this long: the poll stays the safety net.")
    webhook_healthy_seconds: float = Field(
        3600.0, gt=0, description="Webhooks count as healthy this long after the last verified delivery.")

    limits: ManifestLimits = Field(default_factory=ManifestLimits)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    emulator: EmulatorSettings = Field(default_factory=EmulatorSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    # Logging (the --log-level / --log-format flags override these)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log level written to stderr."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="'text': key=value fields; 'json': one JSON object per line."
    )

    _config_file: Path | None = PrivateAttr(None)
    _file_values: dict[str, Any] = PrivateAttr(default_factory=dict)
    _overrides: dict[str, Any] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first. No .env or secrets-dir sources: a daemon's environment
        # comes from its service manager, and one config file is enough to reason about.
        return init_settings, _EnvironmentSource(settings_cls), _ConfigFileSource(settings_cls)

    @field_validator("http", mode="before")
    @classmethod
    def _http_address(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        return format_address(*parse_address(str(value)))

    @field_validator("forget_jobs_after_days")
    @classmethod
    def _forget_after_a_week_at_least(cls, value: float) -> float:
        # A create whose outcome was unknown is watched for stray batches for stray_watch_seconds (about two
        # days), and a batch lives up to 48 h: the job's rows name what may still show up until then.
        if 0 < value < 7:
            raise ValueError("must be 0 (keep every job) or at least 7 days")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        # Values from the config file arrive already resolved against its folder; anything
        # still relative came from defaults, the environment or the command line.
        _make_paths_absolute(self)
        if self.emulator.state_dir is None:
            self.emulator.state_dir = self.state_dir / "emulator"
        _make_paths_absolute(self.emulator)
        return self

    @property
    def config_file(self) -> Path | None:
        """The config file these settings were read from, if any."""
        return self._config_file

    def gemini_api_key(self) -> str:
        """The Gemini API key from the environment, as the google-genai SDK picks it.

        ``GOOGLE_API_KEY`` wins over ``GEMINI_API_KEY`` when both are set. The key is read on
        demand rather than stored, so it can never leak through a settings dump.
        """
        key = os.environ.get("GOOGLE_API_KEY") or os.environ.get("GEMINI_API_KEY")
        register_secret(key)
        if not key:
            raise ConfigError(
                'provider = "gemini" needs an API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) '
                'in the environment, or use provider = "emulator" to run against the local emulator'
            )
        return key

    def redacted_dict(self) -> dict[str, Any]:
        """The settings as JSON-compatible data, safe to print.

        Secrets are masked by type: every ``SecretStr`` setting shows as ``***``, and any registered
        secret value (the API key, ...) is masked wherever else it appears. Names are not a guide:
        ``cost.count_tokens`` is not a secret.
        """
        return redact_data(to_jsonable_python(_redact(self.model_dump())))

    def sources(self) -> dict[str, str]:
        """Where each effective setting (dotted key) came from: default, the config file, BATCHD_*, a flag."""
        return _sources(type(self), self._overrides, self._file_values, self._config_file)


# The config file is picked per load_settings() call, but pydantic-settings builds its sources
# from the class; a context variable hands this call's file values to the source.
_config_file_values: ContextVar[dict[str, Any]] = ContextVar("batchd_config_file_values", default={})


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The values read from the config file, below the environment in priority."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ returns the whole (already nested) mapping at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _config_file_values.get()


class _EnvironmentSource(EnvSettingsSource):
    """``BATCHD_*`` variables, where a list may also be given as a comma list
    (``BATCHD_DISABLED_PLUGINS=variations,sentiment``) as well as JSON (``["variations"]``)."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            if not isinstance(value, str) or value.lstrip().startswith(("[", "{")):
                raise  # meant as JSON: its error is the one to see
            return [part.strip() for part in value.split(",") if part.strip()]


def load_settings(config_path: Path | None = None, **cli_overrides: Any) -> Settings:
    """Load settings with the layering described in the module docstring.

    :param config_path: the ``--config`` flag; ``None`` falls back to ``$BATCHD_CONFIG`` and then
        ``./config.toml`` if it exists.
    :param cli_overrides: command-line flags by setting name; ``None`` values (flags not given)
        are ignored. Nested tables are dicts, e.g. ``emulator={"job_seconds": 0.2}``.
    :raises ConfigError: unreadable file, unknown key, or invalid value.
    """
    config_file = _find_config_file(config_path)
    file_values = _read_config_file(config_file) if config_file else {}
    overrides = {name: value for name, value in cli_overrides.items() if value is not None}
    token = _config_file_values.set(file_values)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        origin = f" (config file {config_file})" if config_file else ""
        raise ConfigError(f"invalid settings{origin}:\n{_format_errors(exc)}") from None
    except SettingsError as exc:  # an environment variable that is neither JSON nor a comma list
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(f"invalid settings: {exc}{cause}") from None
    finally:
        _config_file_values.reset(token)
    settings._config_file = config_file
    settings._file_values = file_values
    settings._overrides = overrides
    for name in SECRET_ENV_VARS:
        register_secret(os.environ.get(name))
    _register_secrets(settings)
    return settings


def _register_secrets(value: Any) -> None:
    """Every SecretStr in the settings (at any depth: tables, lists of tables) joins the redaction registry."""
    if isinstance(value, SecretStr):
        register_secret(value.get_secret_value())
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _register_secrets(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            _register_secrets(item)
    elif isinstance(value, dict):
        for item in value.values():
            _register_secrets(item)


def _sources(model: type[BaseModel], overrides: dict[str, Any], file_values: dict[str, Any],
             config_file: Path | None, prefix: str = "", table_env: str | None = None) -> dict[str, str]:
    environ = {key.upper(): key for key in os.environ}
    found: dict[str, str] = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        env_name = "BATCHD_" + dotted.replace(".", "__").upper()
        nested = _nested_model(field.annotation)
        if nested is not None:  # a table: each of its keys has its own source
            inner_overrides = overrides.get(name) if isinstance(overrides.get(name), dict) else {}
            inner_file = file_values.get(name) if isinstance(file_values.get(name), dict) else {}
            found.update(_sources(nested, inner_overrides, inner_file, config_file, prefix=f"{dotted}.",
                                  table_env=environ.get(env_name, table_env)))
        elif name in overrides:
            found[dotted] = "command line"
        elif env_name in environ or table_env:
            found[dotted] = f"environment {environ.get(env_name, table_env)}"
        elif name in file_values:
            found[dotted] = "config file"
        else:
            found[dotted] = "default"
    return found


def _find_config_file(config_path: Path | None) -> Path | None:
    if config_path is None and os.environ.get(CONFIG_ENV_VAR):
        config_path = Path(os.environ[CONFIG_ENV_VAR])
    if config_path is not None:
        config_path = Path(config_path).expanduser()
        config_path = (config_path if config_path.is_absolute() else working_dir() / config_path).resolve()
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        return config_path
    try:
        default = Path.cwd() / DEFAULT_CONFIG_NAME
    except FileNotFoundError:
        return None  # (the defaults' relative folders then say that the current directory is gone)
    return default.resolve() if default.is_file() else None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deep") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    _check_known_keys(Settings, values, path)
    return _resolve_relative_paths(Settings, values, path.parent)


def _check_known_keys(model: type[BaseModel], values: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Reject keys the model does not declare, naming the key and the file (typos must not pass)."""
    for key, value in values.items():
        field = model.model_fields.get(key)
        dotted = f"{prefix}{key}"
        if field is None:
            table = f" in [{prefix.rstrip('.')}]" if prefix else ""
            known = ", ".join(model.model_fields)
            raise ConfigError(f"{path}: unknown key {dotted!r} (known keys{table}: {known})")
        nested = _nested_model(field.annotation)
        if nested is not None and isinstance(value, dict):
            _check_known_keys(nested, value, path, prefix=f"{dotted}.")


def _resolve_relative_paths(model: type[BaseModel], values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Return ``values`` with relative path settings made absolute against ``base``."""
    resolved = dict(values)
    for key, value in values.items():
        field = model.model_fields[key]
        nested = _nested_model(field.annotation)
        if nested is not None and isinstance(value, dict):
            resolved[key] = _resolve_relative_paths(nested, value, base)
        elif _is_path_field(field.annotation) and isinstance(value, str):
            resolved[key] = str((base / Path(value).expanduser()).resolve())
    return resolved


def working_dir() -> Path:
    """The current directory, which relative paths of the command line, the environment and the defaults are
    taken from; a ConfigError if it was removed (a shell still in a folder deleted under it)."""
    try:
        return Path.cwd()
    except FileNotFoundError:
        raise ConfigError("the current directory no longer exists (it was removed after this shell entered it), "
                          "so relative paths have no meaning: cd to an existing folder, or give the config "
                          "file and folders as absolute paths") from None


def _make_paths_absolute(model: BaseModel) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if _is_path_field(field.annotation) and isinstance(value, Path):
            value = value.expanduser()
            setattr(model, name, (value if value.is_absolute() else working_dir() / value).resolve())


def _is_path_field(annotation: Any) -> bool:
    return annotation in (Path, Path | None)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(settings)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _redact(value: Any) -> Any:
    """``value`` (a python-mode model dump) with every ``SecretStr``, at any depth, replaced by ``***``."""
    if isinstance(value, SecretStr):
        return "***" if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {key: _redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(item) for item in value]
    return value
