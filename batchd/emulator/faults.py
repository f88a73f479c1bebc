"""Fault injection: one SPEC syntax for ``--fault``, ``EmulatorServer(faults=[...])`` and the
``X-Emulator-Fault`` request header (comma-separated specs).

::

    SPEC      := FAULT [ "@" ROUTE { "|" ROUTE } ]
               | JOBFAULT [ "@" GLOB ]                only jobs whose displayName matches GLOB
    FAULT     := [ "http=" ] STATUS [ TRIGGER ]        answer with this HTTP error (429, 500, 503, ...)
               | "slow=" SECONDS [ TRIGGER ]           delay the answer (to outlast a client timeout)
               | "late=" SECONDS [ TRIGGER ]           handle the request, then delay its answer: the
                                                      effect happens, a client that timed out never hears
               | "fail-requests=" FRACTION             that share of a batch's requests fail
               | "drop-metadata" [ "=" FRACTION ]      inline answers lose their metadata (default: all)
               | "shuffle"                            inline answers come back out of input order
               | "job-failed" | "job-expired"         the job ends FAILED / EXPIRED, no results
               | "stuck-pending"                      the job stays PENDING (until it expires)
               | "list-lag=" N | "list-lag=" SECONDS "s"  the job is left out of its first N list
                                                      passes / of lists for SECONDS after its create
               | "webhook-lost"                       the job's webhook events are never delivered
               | "webhook-duplicate"                  each of its webhook events is delivered twice
               | "webhook-late=" SECONDS              its webhook events leave SECONDS late
    TRIGGER   := ":" RATE        with this probability (seeded, reproducible)
               | "/" N           on every N-th matching request (the N-th, 2N-th, ...)
               | "*" K           on the first K matching requests only
    ROUTE     := create | get | list | cancel | delete | upload-start | upload-chunk | file-get
               | file-list | file-delete | download | count-tokens | generate | embed | model-get
               | model-list | webhooks
               | batches | files | models | upload      (groups)

Examples: ``503``, ``http=429:0.2``, ``503/3@get`` (every third get), ``500*1@create`` (the first
create only), ``slow=3@download``, ``late=3*1@upload-chunk`` (the first upload lands, its answer too
late), ``fail-requests=0.1``, ``shuffle,drop-metadata``, ``job-expired@*-c0`` (jobs whose display name
ends in ``-c0`` expire; others run normally).

Request faults (``http``, ``slow``) are decided per request. Counters and random sources belong to
the spec: each ``--fault`` has its own, and a header spec shares one with every request that
carries the same spec text, so "every third get" counts across requests. Randomness is seeded from
the spec text, so a test run is reproducible. Job faults (the rest) are recorded with a job when it
is created (from the server's faults and the create request's header, those with a display-name
glob only when it matches) and decided per request index, so a restarted emulator gives the same
answers.
"""

from __future__ import annotations

import fnmatch
import random
import re
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from batchd.emulator.errors import STATUS_NAMES, ApiError, injected, invalid

ROUTES = frozenset({
    "create", "get", "list", "cancel", "delete",
    "upload-start", "upload-chunk", "file-get", "file-list", "file-delete", "download",
    "count-tokens", "generate", "embed", "model-get", "model-list", "webhooks",
})
ROUTE_GROUPS = {
    "batches": frozenset({"create", "get", "list", "cancel", "delete"}),
    "files": frozenset({"upload-start", "upload-chunk", "file-get", "file-list", "file-delete", "download"}),
    "upload": frozenset({"upload-start", "upload-chunk"}),
    "models": frozenset({"count-tokens", "generate", "embed", "model-get", "model-list"}),
}
REQUEST_FAULTS = frozenset({"http", "slow", "late"})
JOB_FAULTS = frozenset({"fail-requests", "drop-metadata", "shuffle", "job-failed", "job-expired", "stuck-pending",
                        "list-lag", "webhook-lost", "webhook-duplicate", "webhook-late"})

HEADER = "x-emulator-fault"

_BARE_STATUS = re.compile(r"^\d{3}(?:[:/*].*)?$")
_TRIGGER = re.compile(r"^(?P<value>[^:/*]+)(?:(?P<op>[:/*])(?P<arg>.+))?$")


@dataclass(frozen=True)
class Fault:
    """One parsed SPEC. ``text`` is the spec as written; it also seeds the fault's randomness."""

    text: str
    kind: str
    status: int = 0
    seconds: float = 0.0
    rate: float = 1.0  # http/slow: probability per matching request
    every: int = 0  # http/slow: fire on every N-th matching request
    first: int = 0  # http/slow: fire on the first K matching requests
    fraction: float = 1.0  # fail-requests/drop-metadata: share of the batch's requests
    lists: int = 0  # list-lag: list passes (lists without a page token) that leave the job out
    routes: frozenset[str] = field(default=ROUTES)
    display_name: str | None = None  # job faults: only jobs whose displayName matches this glob

    @property
    def is_job_fault(self) -> bool:
        return self.kind in JOB_FAULTS

    def applies_to_job(self, display_name: str | None) -> bool:
        """Whether a job fault is recorded with a job of this display name."""
        return self.display_name is None or fnmatch.fnmatchcase(display_name or "", self.display_name)


def parse_fault(text: str) -> Fault:
    """Parse one SPEC; raises ``ValueError`` with a readable message."""
    spec = text.strip()
    body, at, route_text = spec.partition("@")
    name, has_value, value = body.partition("=")
    if name in JOB_FAULTS:
        return _parse_job_fault(spec, name, has_value, value, route_text if at else None)
    routes = _parse_routes(route_text, spec) if route_text else ROUTES
    if _BARE_STATUS.match(body):  # "503", "503:0.5", "503/3" are short for "http=503..."
        name, has_value, value = "http", "=", body
    if name in REQUEST_FAULTS:
        if not has_value:
            raise ValueError(f"fault {spec!r}: {name} needs a value, e.g. {name}=503" if name == "http"
                             else f"fault {spec!r}: {name} needs seconds, e.g. {name}=3")
        return _parse_request_fault(spec, name, value, routes)
    raise ValueError(f"unknown fault {spec!r}; known: http=STATUS, slow=SECONDS, late=SECONDS, {', '.join(sorted(JOB_FAULTS))}")


def _parse_job_fault(spec: str, name: str, has_value: str, value: str, display_name: str | None) -> Fault:
    if display_name is not None and not display_name.strip():
        raise ValueError(f"fault {spec!r}: a job fault's @ takes a display-name glob, e.g. {name}@*-c0")
    if display_name is not None and display_name.strip() in ROUTES | set(ROUTE_GROUPS):
        raise ValueError(f"fault {spec!r}: job faults apply to the job a create makes; they take no @routes "
                         f"(after @ comes a display-name glob, e.g. {name}@*-c0)")
    if name == "fail-requests" and not has_value:
        raise ValueError(f"fault {spec!r}: fail-requests needs a fraction, e.g. fail-requests=0.1")
    if name == "list-lag":
        return _parse_list_lag(spec, value if has_value else "")
    if name == "webhook-late":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not has_value or not seconds >= 0:
            raise ValueError(f"fault {spec!r}: webhook-late needs seconds, e.g. webhook-late=3")
        return Fault(text=spec, kind=name, seconds=seconds,
                     display_name=display_name.strip() if display_name is not None else None)
    if has_value and name not in ("fail-requests", "drop-metadata"):
        raise ValueError(f"fault {spec!r}: {name} takes no value")
    fraction = _fraction(value, spec) if has_value else 1.0
    return Fault(text=spec, kind=name, fraction=fraction,
                 display_name=display_name.strip() if display_name is not None else None)


def job_faults_for(specs: Iterable[str], display_name: str | None) -> list[str]:
    """The job fault specs recorded with a new job of this display name (the others' globs do not match)."""
    return [fault.text for fault in parse_faults(list(specs)) if fault.applies_to_job(display_name)]


def parse_faults(specs: Iterable[str] | str | None) -> list[Fault]:
    """Parse a list of specs, or one comma-separated string (the header form)."""
    if not specs:
        return []
    if isinstance(specs, str):
        specs = specs.split(",")
    return [parse_fault(spec) for spec in specs if spec.strip()]


def _parse_request_fault(spec: str, kind: str, value: str, routes: frozenset[str]) -> Fault:
    match = _TRIGGER.match(value)
    if not match:
        raise ValueError(f"fault {spec!r}: cannot read {value!r}")
    trigger: dict = {}
    op, arg = match["op"], match["arg"]
    try:
        if op == ":":
            trigger["rate"] = _fraction(arg, spec)
        elif op == "/":
            trigger["every"] = int(arg)
        elif op == "*":
            trigger["first"] = int(arg)
        if trigger.get("every", 1) < 1 or trigger.get("first", 1) < 1:
            raise ValueError(f"fault {spec!r}: counts must be at least 1")
        if kind == "http":
            status = int(match["value"])
            if status not in STATUS_NAMES or status < 400:
                raise ValueError(f"fault {spec!r}: status must be one of {sorted(STATUS_NAMES)}")
            return Fault(text=spec, kind=kind, status=status, routes=routes, **trigger)
        seconds = float(match["value"])
    except ValueError as error:
        raise ValueError(str(error) if str(error).startswith("fault") else f"fault {spec!r}: {error}") from None
    if seconds < 0:
        raise ValueError(f"fault {spec!r}: seconds must not be negative")
    return Fault(text=spec, kind=kind, seconds=seconds, routes=routes, **trigger)


def _parse_list_lag(spec: str, value: str) -> Fault:
    """``list-lag=N`` (list passes) or ``list-lag=SECONDSs`` (seconds after the create)."""
    problem = f"fault {spec!r}: list-lag needs a count of lists or seconds, e.g. list-lag=2 or list-lag=1.5s"
    try:
        if value.endswith("s"):
            seconds = float(value[:-1])
            if seconds < 0:
                raise ValueError(problem)
            return Fault(text=spec, kind="list-lag", seconds=seconds)
        lists = int(value)
    except ValueError:
        raise ValueError(problem) from None
    if lists < 1:
        raise ValueError(f"fault {spec!r}: list-lag counts must be at least 1")
    return Fault(text=spec, kind="list-lag", lists=lists)


def _parse_routes(text: str, spec: str) -> frozenset[str]:
    routes: set[str] = set()
    for name in text.split("|"):
        name = name.strip()
        if name in ROUTES:
            routes.add(name)
        elif name in ROUTE_GROUPS:
            routes |= ROUTE_GROUPS[name]
        else:
            raise ValueError(f"fault {spec!r}: unknown route {name!r}; known: "
                             f"{', '.join(sorted(ROUTES | set(ROUTE_GROUPS)))}")
    return frozenset(routes)


def _fraction(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"fault {spec!r}: {text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"fault {spec!r}: {text!r} must be between 0 and 1")
    return value


def _seed(*parts: object) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def _unit(seed: int, index: int) -> float:
    """A reproducible number in [0, 1) for (seed, index): a cheap hash, no state."""
    return zlib.crc32(index.to_bytes(8, "little"), seed) / 2**32


# ------------------------------------------------------------------------------------------------
# Request faults


class _Trigger:
    """Counter and seeded random source of one request fault."""

    def __init__(self, fault: Fault, source: str) -> None:
        self.fault = fault
        self.count = 0
        self.random = random.Random(_seed(source, fault.text))

    def fires(self) -> bool:
        self.count += 1
        fault = self.fault
        if fault.first:
            return self.count <= fault.first
        if fault.every:
            return self.count % fault.every == 0
        return fault.rate >= 1.0 or self.random.random() < fault.rate


@dataclass
class RequestFaults:
    """What the faults decided for one request."""

    delay: float = 0.0
    late: float = 0.0  # seconds between the handler's answer and sending it
    error: ApiError | None = None
    job_faults: tuple[str, ...] = ()  # specs to record with a job this request creates


class FaultInjector:
    """Decides request faults for each request; thread-safe."""

    def __init__(self, specs: Iterable[str] = ()) -> None:
        faults = parse_faults(list(specs))
        self._lock = threading.Lock()
        self._server_triggers = [_Trigger(f, f"server#{i}") for i, f in enumerate(faults) if not f.is_job_fault]
        self.server_job_faults = tuple(f.text for f in faults if f.is_job_fault)
        self._header_triggers: dict[str, _Trigger] = {}

    def decide(self, route: str, header: str | None) -> RequestFaults:
        """Apply server faults and the request's ``X-Emulator-Fault`` header to one request on ``route``."""
        try:
            header_faults = parse_faults(header)
        except ValueError as error:
            raise invalid(f"X-Emulator-Fault: {error}") from None
        decided = RequestFaults(job_faults=self.server_job_faults + tuple(f.text for f in header_faults
                                                                           if f.is_job_fault))
        with self._lock:
            triggers = list(self._server_triggers)
            for fault in header_faults:
                if not fault.is_job_fault:
                    triggers.append(self._header_triggers.setdefault(fault.text, _Trigger(fault, "header")))
            for trigger in triggers:
                fault = trigger.fault
                if route not in fault.routes or not trigger.fires():
                    continue
                if fault.kind == "slow":
                    decided.delay = max(decided.delay, fault.seconds)
                elif fault.kind == "late":
                    decided.late = max(decided.late, fault.seconds)
                elif decided.error is None:
                    decided.error = injected(fault.status)
        return decided


# ------------------------------------------------------------------------------------------------
# Job faults


class JobFaults:
    """The job faults recorded with one job, answering per-request questions reproducibly."""

    def __init__(self, specs: Iterable[str]) -> None:
        self.specs = tuple(specs)
        faults = [f for f in parse_faults(list(self.specs)) if f.is_job_fault]
        kinds = {f.kind: f for f in faults}
        self.job_failed = "job-failed" in kinds
        self.job_expired = "job-expired" in kinds
        self.stuck_pending = "stuck-pending" in kinds
        self.shuffle = "shuffle" in kinds
        self._fail = kinds.get("fail-requests")
        self._drop = kinds.get("drop-metadata")
        lag = kinds.get("list-lag")
        #: List passes that leave the job out, and seconds after its create that lists leave it out.
        self.list_lag_lists = lag.lists if lag else 0
        self.list_lag_seconds = lag.seconds if lag else 0.0
        self.webhook_lost = "webhook-lost" in kinds
        self.webhook_duplicate = "webhook-duplicate" in kinds
        late = kinds.get("webhook-late")
        #: Seconds the job's webhook events wait before their first delivery attempt.
        self.webhook_late_seconds = late.seconds if late else 0.0

    @property
    def produces_results(self) -> bool:
        return not (self.job_failed or self.job_expired or self.stuck_pending)

    def request_fails(self, index: int) -> bool:
        fault = self._fail
        return fault is not None and _unit(_seed(fault.text), index) < fault.fraction

    def drops_metadata(self, index: int) -> bool:
        fault = self._drop
        return fault is not None and _unit(_seed(fault.text, "drop"), index) < fault.fraction

    def order(self, count: int) -> list[int]:
        """The order answers are written in: input order, or a reproducible shuffle of it."""
        order = list(range(count))
        if self.shuffle and count > 1:
            random.Random(_seed("shuffle", count)).shuffle(order)
            if order == sorted(order):  # a shuffle that changed nothing would hide the fault
                order.reverse()
        return order


FAILED_REQUEST = ApiError(500, "Emulated failure of this request (fault fail-requests).", "INTERNAL")
