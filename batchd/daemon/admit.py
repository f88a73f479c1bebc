"""Admit: a ``received`` job gets its cost estimate and a budget decision → admitted, or ``held``.

A job is *priced first* (its requests read once for the estimate, nothing built or sent) when a budget
could hold it, and when its requests come from input files: then its build sends each chunk as soon as
it is built (the whole job was already read and priced), so a large job's first batches run remotely
while its later chunks are still being written, instead of all of them waiting for its last row. Those
passes run in a bounded pool, a job waiting its turn in the journal. Any other job (its items inline
in the manifest, so small: ``limits.manifest_bytes``) is admitted at once and priced from its build
pass, which holds its chunks until it has read every item (see :mod:`batchd.daemon.build`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from batchd.cache import cache_path, uncached
from batchd.costs import JobInfo, RequestStream, spend_of
from batchd.encoding import EmbedRequestEncoder, RequestEncoder
from batchd.costs import describe as describe_cost
from batchd.daemon.context import Context, Turns, Work, manifest_error
from batchd.daemon.claim_inputs import read_inputs_record
from batchd.inbox import UnsafeEntry, read_entry
from batchd.journal import Job, replace_row
from batchd.manifest import Manifest, ManifestError, load_manifest
from batchd.media import MediaResolver
from batchd.model_check import ModelCheck, model_source, models_cache_path
from batchd.plugin_calls import PluginTimeout, Prefetch
from batchd.provider import Provider
from batchd.states import JobState

log = logging.getLogger("batchd")

#: Held jobs are checked against the budget again at most this often.
HELD_REVIEW_SECONDS = 1.0
#: Prompts of fewer characters than this are not worth a countTokens round trip of their own once a
#: ratio of characters to tokens is known for the model (from a larger count, of any job).
SMALL_COUNT_CHARS = 20_000
#: How long a model's measured characters-per-token ratio is trusted for small jobs.
RATIO_TRUSTED_SECONDS = 3600.0
#: Characters a ratio's counts must cover in all before small jobs are priced with it.
RATIO_MIN_CHARS = 1000


def load_claimed(ctx: Context, job: Job) -> Manifest:
    """The manifest of a claimed job, from its spool (inputs were validated at the claim): the bytes
    checked at the claim, or an error. A producer that kept the file open for writing could change it
    after the check; what runs is only ever what was checked (and what its outbox folder will hold).
    The bytes are always read and compared; their parse is the claim's when it was kept
    (:class:`batchd.daemon.context.ClaimedManifests`)."""
    spool = ctx.spool(job.id)
    path = spool.manifest_path(job.source)
    kept = ctx.claimed_manifests.take(job.id, job.manifest_sha256, path)  # (taken even if what follows fails)
    try:
        content = read_entry(path, ctx.settings.limits.manifest_bytes).content
    except (OSError, UnsafeEntry) as error:
        raise ManifestError(path, f"the claimed manifest cannot be read: {error}") from None
    if job.manifest_sha256 is not None and hashlib.sha256(content).hexdigest() != job.manifest_sha256:
        raise ManifestError(path, "the manifest changed after batchd checked it (was it still open for "
                                  "writing?); drop it again once it is complete")
    if kept is not None:
        return kept  # parsed from these very bytes by the claim
    return load_manifest(path, input_dir=spool.inputs, tasks=ctx.tasks, check_inputs=False, content=content,
                         limits=ctx.settings.limits, media_dir=ctx.settings.inbox)


class TokenCounter:
    """countTokens for cost estimates, shared by every job: a small job's prompts are priced with the
    characters-per-token ratio this model's counts measured, instead of a round trip each (a burst of
    small manifests otherwise makes one countTokens call per job). The ratio is trusted once counts
    of :data:`RATIO_MIN_CHARS` characters in all stand behind it (one long prompt, or the first few
    small jobs), for :data:`RATIO_TRUSTED_SECONDS`; then it is measured anew."""

    def __init__(self, provider: Callable[[], Provider]):
        self._provider = provider
        self._measured: dict[str, _Ratio] = {}
        self._lock = threading.Lock()

    def for_model(self, model: str) -> ModelTokenCounter:
        return ModelTokenCounter(self, model)

    def count(self, model: str, texts: list[str]) -> tuple[int, str]:
        """The tokens of ``texts`` for ``model``, and how they were counted (see :class:`ModelTokenCounter`)."""
        texts = list(texts)
        chars = sum(len(text) for text in texts)
        now = time.monotonic()
        with self._lock:
            ratio = self._measured.get(model)
            if ratio is not None and now - ratio.started_at >= RATIO_TRUSTED_SECONDS:
                del self._measured[model]  # stale: measured anew
                ratio = None
        if ratio is not None and ratio.trusted() and chars < SMALL_COUNT_CHARS:
            per_token = ratio.chars_per_token()
            return max(1, round(chars / per_token)), f"countTokens ratio ({per_token:.2f} characters a token)"
        counted = self._provider().count_tokens(model, texts)
        if counted:
            with self._lock:
                self._measured.setdefault(model, _Ratio(started_at=now)).add(chars, counted)
        return counted, "countTokens"


class ModelTokenCounter:
    """The ``count_tokens`` a cost plugin is given for one job's model: ``count_tokens(texts) -> int``.
    ``method`` says how its last count was made, for the estimate's ``method``: ``"countTokens"`` (a
    call), or the characters-per-token ratio this model's earlier calls measured (no call)."""

    def __init__(self, counter: TokenCounter, model: str):
        self._counter = counter
        self.model = model
        self.method = "countTokens"

    def __call__(self, texts: list[str]) -> int:
        tokens, self.method = self._counter.count(self.model, texts)
        return tokens


@dataclass
class _Ratio:
    """Characters and tokens counted for one model since ``started_at``."""

    started_at: float
    chars: int = 0
    tokens: int = 0

    def add(self, chars: int, tokens: int) -> None:
        self.chars += chars
        self.tokens += tokens

    def trusted(self) -> bool:
        return self.chars >= RATIO_MIN_CHARS  # a ratio from a few words is mostly noise

    def chars_per_token(self) -> float:
        return self.chars / self.tokens


class Admit:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.estimates = ctx.workers("estimate", ctx.settings.max_concurrent_builds)
        self.turns = Turns()
        self.tokens = TokenCounter(lambda: ctx.provider)
        #: Whether the provider serves a job's model, asked before anything of the job is priced or sent.
        self.models = ModelCheck(lambda: ctx.provider, model_source(ctx.settings),
                                 models_cache_path(ctx.settings.state_dir)) if ctx.settings.check_models else None
        #: The service asked about a model (the list, a models.get), by model: one at a time, never the loop.
        self.model_lookups = ctx.workers("models", 1, keyed_by_job=False, daemon=True)
        self._awaiting_model: set[str] = set()  # jobs waiting for a model lookup
        self._finished: dict[str, Work] = {}  # job id → its estimate pass, ended, not yet taken
        #: job id → what stopped its estimate pass reading the requests (a bad row, a hung or failing task)
        self._unreadable: dict[str, list[Exception]] = {}
        self._dropped: set[str] = set()  # jobs delivered while their estimate ran: its answer is not wanted
        self._reads_files: dict[str, bool] = {}  # job id → whether its requests come from input files
        self._held_reviewed_at = float("-inf")

    def step(self, job: Job) -> None:
        """A ``received`` job not yet admitted: estimate, then admit or hold."""
        ctx = self.ctx
        if self._model_refused(job) is not False:
            return  # rejected on its next visit, or waiting for the service to say
        if job.cost is None and ctx.costs.estimates and not self._priced_first(job):
            self._reads_files.pop(job.id, None)
            ctx.journal.update_job(job.id, admitted_at=time.time())  # priced from its build pass
            return
        if job.cost is None and ctx.costs.active:
            estimate = self._estimate(job)
            if estimate is None:
                return  # still running or waiting its turn, or the manifest turned out unusable
            self._reads_files.pop(job.id, None)
            cost = {"estimate": estimate["result"]}
            ctx.journal.update_job(job.id, cost=cost, spend=spend_of(cost))
            log.info("job %s: estimated %s", job.id, describe_cost(cost["estimate"]), extra={"job": job.id})
            job = ctx.journal.job(job.id)
        reasons = [] if job.approved else self._budget_reasons(job)
        if reasons:
            reason = "; ".join(reasons)
            held = replace_row(job, state=JobState.HELD, hold=reason)
            ctx.journal.update_job(job.id, state=JobState.HELD, hold=reason,
                                   events=[ctx.event("held", held, reason=reason)])
            ctx.log_event("held", logging.WARNING,
                          "job %s (%s) held: %s; release it with `batchd approve %s` or a higher budget",
                          job.id, job.source, reason, job.name)
            return
        ctx.journal.update_job(job.id, admitted_at=time.time())

    def _priced_first(self, job: Job) -> bool:
        """Whether the job's requests are read for its estimate before it is built (see the module's
        docstring): a budget could hold it, or they come from input files."""
        ctx = self.ctx
        if not job.approved and ctx.costs.budget_may_hold(ctx.settings):
            return True
        reads_files = self._reads_files.get(job.id)
        if reads_files is None:  # asked at every visit until the job is admitted: its spool is read once
            reads_files = self._reads_files[job.id] = bool(read_inputs_record(ctx.spool(job.id).inputs))
        return reads_files

    def _model_refused(self, job: Job) -> bool | None:
        """Reject the job (its error committed; delivered ``rejected`` next: True) when the provider does not
        serve its model; None while the service is asked (in the lookup thread: the job is visited again
        when it has answered)."""
        if self.models is None or job.cost is not None:
            return False  # checked before it was priced
        model = self.ctx.model_of(job)
        known, problem = self.models.answer(model)
        if not known:
            self._awaiting_model.add(job.id)
            if model not in self.model_lookups and self.model_lookups.free():
                self.model_lookups.start(model, self.models.refresh, model)
            return None
        if problem is None:
            return False
        log.error("job %s (%s): %s", job.id, job.source, problem, extra={"job": job.id})
        self.ctx.journal.update_job(job.id, error={"code": "unknown_model", "file": job.source, "field": "model",
                                                   "message": f"{job.source}: {problem}"})
        return True

    def collect(self) -> None:
        """Take the estimate passes that ended; hand their threads to the jobs waiting longest. Once a model
        lookup has ended, the jobs waiting for one are visited again (one for another model starts it)."""
        for work in self.model_lookups.finished():
            work.future.result()  # the lookup logs what the service could not say; anything else is a bug
            for job_id in self._awaiting_model:
                self.ctx.mark(job_id)
            self._awaiting_model.clear()
        for work in self.estimates.finished():
            if work.key in self._dropped:
                self._dropped.discard(work.key)
                self._unreadable.pop(work.key, None)
            else:
                self._finished[work.key] = work
        self.turns.call(self.estimates.free(), self.ctx.mark)

    def forget(self, job_id: str) -> None:
        """The job is delivered (cancelled, rejected) while it waited for or ran its estimate."""
        self.turns.forget(job_id)
        self._reads_files.pop(job_id, None)
        self._finished.pop(job_id, None)
        self._unreadable.pop(job_id, None)
        if job_id in self.estimates:
            self._dropped.add(job_id)

    def _estimate(self, job: Job) -> dict | None:
        """Start the job's estimate, or take it: ``{"result": estimate}`` once it is there."""
        ctx = self.ctx
        work = self._finished.pop(job.id, None)
        if work is not None:
            unreadable = self._unreadable.pop(job.id, [])
            if ctx.stopping.is_set():
                return None  # cut short by the stop: estimated again after the restart
            if unreadable:
                # A bad row, or the task hung or failed reading its requests: building it would only stop
                # the same way. Rejected next tick, with nothing sent.
                ctx.journal.update_job(job.id, error=self._unreadable_error(job, unreadable[0]))
                return None
            return {"result": work.future.result()}  # CostHooks.estimate turns a plugin's failure into an error entry
        if job.id in self.estimates:
            return None
        if not self.turns.first(job.id, self.estimates.free()):
            self.turns.wait(job)
            return None
        try:
            manifest = load_claimed(ctx, job)
        except ManifestError as error:
            ctx.journal.update_job(job.id, error=manifest_error(error, ctx.settings.limits.error_chars))
            return None
        model = manifest.model or ctx.settings.model
        ctx.journal.update_job(job.id, task=manifest.task, model=model, kind=manifest.kind)
        info = JobInfo.of(replace_row(job, task=manifest.task, model=model, kind=manifest.kind))
        unreadable = self._unreadable[job.id] = []
        stream = RequestStream(lambda: self._watched_requests(job.id, manifest, unreadable),
                               stopping=ctx.stopping.is_set)
        self.estimates.start(job.id, ctx.costs.estimate, info, stream, self.tokens.for_model(model), ctx.settings,
                             ctx.journal.observed_output(manifest.task, model))
        return None

    def _watched_requests(self, job_id: str, manifest: Manifest, unreadable: list[Exception]):
        """The manifest's requests, read in a thread of their own with a bounded wait (for the estimate pass).
        What stops the reading is kept in ``unreadable``: the estimate hook only sees an unknown cost."""
        ctx = self.ctx
        clock = ctx.plugin_clock(manifest.task, "requests()")
        # Files are checked and sized (for their price), not kept: the build reads them again to send them.
        files = MediaResolver(ctx.settings.inbox, None)
        feed = Prefetch(clock.iterate(manifest.requests(files)), clock, name=f"batchd-requests-{job_id}", batch=1000)
        requests = feed.iterate(ctx.settings.plugin_timeout_seconds, ctx.stopping.is_set)
        if manifest.common.cache if manifest.common.cache is not None else ctx.settings.cache:
            # Requests the request cache answers are never sent, so never priced.
            model = manifest.model or ctx.settings.model
            encoder = EmbedRequestEncoder() if manifest.kind == "embed" else RequestEncoder(model)
            requests = uncached(requests, cache_path(ctx.settings.state_dir), manifest.kind, model, encoder.encode)
        try:
            yield from requests
        except Exception as error:
            unreadable.append(error)
            raise

    def _unreadable_error(self, job: Job, error: Exception) -> dict:
        """The rejection of a job whose estimate pass could not read its requests: as its build would say it."""
        if isinstance(error, ManifestError):
            return manifest_error(error, self.ctx.settings.limits.error_chars)
        if isinstance(error, PluginTimeout):
            log.error("job %s: %s", job.id, error, extra={"job": job.id})
            return {"message": str(error)}
        log.error("job %s: reading its requests failed", job.id, exc_info=error, extra={"job": job.id})
        return {"message": f"task {job.task!r} failed to build requests: {type(error).__name__}: {error}"}

    # -- held jobs ----------------------------------------------------------------------------------

    def review_now(self) -> None:
        """Review the held jobs on this tick (one was approved or cancelled)."""
        self._held_reviewed_at = float("-inf")

    def review_held(self, *, force: bool = False) -> bool:
        """Release held jobs that were approved or now fit the budget; deliver cancelled ones.

        Budgets are checked at most every :data:`HELD_REVIEW_SECONDS` unless ``force``d.
        Returns whether any job left ``held``.
        """
        ctx = self.ctx
        now = time.monotonic()
        if not force and now - self._held_reviewed_at < HELD_REVIEW_SECONDS:
            return False
        self._held_reviewed_at = now
        released = False
        for job in ctx.journal.jobs(states=(JobState.HELD,)):
            if job.cancel_requested:
                ctx.journal.update_job(job.id, state=JobState.RECEIVED)  # delivered as cancelled next
                released = True
                continue
            if not job.approved and self._budget_reasons(job):
                continue
            why = "approved" if job.approved else "now within budget"
            ctx.journal.update_job(job.id, state=JobState.RECEIVED, admitted_at=time.time(), hold=None)
            log.info("job %s (%s) released: %s", job.id, job.source, why)
            released = True
        return released

    def _budget_reasons(self, job: Job) -> list[str]:
        ctx = self.ctx
        estimate = (job.cost or {}).get("estimate")
        return ctx.costs.budget_reasons(
            JobInfo.of(job, ctx.settings.model), estimate,
            lambda since: ctx.journal.spent_since(since, excluding=job.id), ctx.settings)

    def close(self) -> None:
        self.estimates.shutdown(cancel=True)
        self.model_lookups.shutdown(cancel=True)
