"""Whether the provider serves a manifest's model: asked at ``batchd submit`` and when the daemon admits a
job, so that a misspelt model is refused before anything is sent (with the close names it may mean),
instead of failing every create after the job was priced and built.

The provider's model list (``models.list``) is read once and kept for :data:`MODEL_LIST_SECONDS`, in
memory and in ``state_dir/models.json`` (so ``batchd submit`` next to a running daemon asks nothing);
a name the list lacks is asked about with ``models.get`` (Google, like the emulator, takes ids of a
current family that it does not list), and that answer is kept too, for at most :data:`MAX_ANSWERS`
names. When the service cannot answer (down, throttling, refusing the key) the model is not checked:
the job goes on, and a create names the problem if there is one.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from batchd.provider import Provider

log = logging.getLogger("batchd")

#: How long the provider's model list, and its answer about a name not in it, are trusted.
MODEL_LIST_SECONDS = 3600.0
#: After the list could not be read, how long before it is asked for again.
RETRY_SECONDS = 60.0
#: Names not in the list whose ``models.get`` answer is kept (the oldest is forgotten first).
MAX_ANSWERS = 256
#: Ids kept of a model list (Google lists about fifty).
MAX_LISTED = 10_000


#: What a model id looks like (it goes into the URL path of every create).
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def models_cache_path(state_dir: Path) -> Path:
    return state_dir / "models.json"


class ModelCheck:
    """Whether ``provider()`` serves a model; ``source`` names the service the cache file is valid for."""

    def __init__(self, provider: Callable[[], Provider], source: str, cache_file: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self._provider = provider
        self.source = source
        self._cache_file = cache_file
        self._clock = clock
        self._listed: frozenset[str] | None = None
        self._listed_at = float("-inf")
        self._list_failed_at = float("-inf")
        self._answers: dict[str, tuple[bool, float]] = {}  # name → (served, when asked), oldest first
        self._get_failed_at: dict[str, float] = {}  # name → when models.get could not say, oldest first
        self._refreshing = threading.Lock()
        self._read_cache()

    def problem(self, model: str) -> str | None:
        """Why ``model`` cannot be used (it is not served, and close names), or None (served, or unknown);
        asks the service what it must (:meth:`refresh`) first."""
        self.refresh(model)
        return self.answer(model)[1]

    def answer(self, model: str) -> tuple[bool, str | None]:
        """What is known of ``model`` now, asking nothing: ``(True, problem)``, the problem None when it is
        served or cannot be checked; ``(False, None)`` when the service is to be asked first (:meth:`refresh`,
        which the daemon calls from a worker: the loop never waits for the service here)."""
        name = model.removeprefix("models/")
        if name.startswith("tunedModels/"):
            return True, None  # a tuned model of the project's own: models.get may not see it, creates do
        if not _MODEL_ID.fullmatch(name):
            shown = name if len(name) <= 100 else name[:100] + "…"
            return True, f"{shown!r} is not a model id (letters, digits, '.', '-' and '_'; such as 'gemini-2.5-flash')"
        now = self._clock()
        if not self._list_settled(now):
            return False, None
        listed = self._listed
        if listed is not None and name in listed:
            return True, None
        if listed is None:
            return True, None  # the service cannot say (and the log said so): not checked
        answer = self._answers.get(name)
        if answer is None or now - answer[1] >= MODEL_LIST_SECONDS:
            # Asked, and the service could not say (logged), a moment ago: not checked, the create will tell.
            return now - self._get_failed_at.get(name, float("-inf")) < RETRY_SECONDS, None
        if answer[0]:
            return True, None
        close = [repr(c) for c in difflib.get_close_matches(name, sorted(listed), n=3, cutoff=0.6)]
        hint = ""
        if close:
            hint = f"; did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"
        listing = f"; models.list has {len(listed)} others" if listed else ""
        return True, f"model {name!r} is not a model {self.source} serves (models.get: 404 NOT_FOUND{listing}){hint}"

    def refresh(self, model: str) -> None:
        """Ask the service what :meth:`answer` needs to know of ``model``: the model list when it is stale,
        then ``models.get`` of a name the list lacks. A failure is logged, and the model not checked for
        :data:`RETRY_SECONDS`. One refresh at a time (any thread)."""
        with self._refreshing:
            if self.answer(model)[0]:
                return
            now = self._clock()
            if not self._list_settled(now):
                self._read_list(now)
                if self.answer(model)[0]:
                    return
            name = model.removeprefix("models/")
            try:
                served = self._provider().model_exists(name)
            except Exception as error:  # the service cannot say: not checked, the create will tell
                log.warning("model %r could not be checked against the provider's models (%s); not checked",
                            name, error)
                _remember(self._get_failed_at, name, now)
                return
            _remember(self._answers, name, (served, now))

    def _list_settled(self, now: float) -> bool:
        """Whether the model list is fresh, or was asked for in vain too recently to ask again."""
        return now - self._listed_at < MODEL_LIST_SECONDS or now - self._list_failed_at < RETRY_SECONDS

    def _read_list(self, now: float) -> None:
        try:
            names = self._provider().list_models()
        except Exception as error:
            self._list_failed_at = now
            log.warning("the provider's model list could not be read (%s); asked again in %.0f s",
                        error, RETRY_SECONDS)
            return
        self._listed, self._listed_at = frozenset(names[:MAX_LISTED]), now
        self._write_cache()

    def _read_cache(self) -> None:
        if self._cache_file is None:
            return
        try:
            cached = json.loads(self._cache_file.read_text(encoding="utf-8"))
            if cached["source"] != self.source:
                return
            fetched_at, models = float(cached["fetched_at"]), cached["models"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if isinstance(models, list) and 0 <= self._clock() - fetched_at < MODEL_LIST_SECONDS:
            self._listed = frozenset(str(m) for m in models[:MAX_LISTED])
            self._listed_at = fetched_at

    def _write_cache(self) -> None:
        if self._cache_file is None:
            return
        from batchd import durable

        try:
            durable.atomic_write(self._cache_file, json.dumps(
                {"source": self.source, "fetched_at": self._listed_at, "models": sorted(self._listed or ())}))
        except OSError as error:  # only a cache: the next check asks the provider again
            log.debug("cannot write %s: %s", self._cache_file, error)


def _remember(answers: dict, name: str, value) -> None:
    """Keep ``value`` for ``name``, as the newest of at most :data:`MAX_ANSWERS`."""
    answers.pop(name, None)
    if len(answers) >= MAX_ANSWERS:
        del answers[next(iter(answers))]
    answers[name] = value


def model_source(settings) -> str:
    """What a cached model list is valid for: the emulator, or the Gemini API at its base URL."""
    import os

    if settings.provider == "emulator":
        return "the emulator"
    base = os.environ.get("GOOGLE_GEMINI_BASE_URL")
    return f"the Gemini API ({settings.api_version}{', ' + base if base else ''})"
