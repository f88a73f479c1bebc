"""Task plugin code run with a bounded wait: a plugin that hangs fails its job, never the daemon.

A task's ``requests()`` and ``organize()`` are generators that run for as long as a job has
requests or results, so no single deadline fits them. What is bounded is the time a plugin
keeps control without handing anything back: ``plugin_timeout_seconds`` from when batchd asks it
for its next request (or hands it a result, or asks for its next organized entry) until it
answers. A :class:`PluginClock` is stamped at each of those hand-overs.

Plugin code runs in a daemon thread of its own (:class:`InThread`, :class:`Prefetch`,
:class:`OnDemand` for a job's chunks), never in
the loop's thread or in a pool's: a plugin that never returns keeps that thread forever, and
only a daemon thread neither blocks the loop nor holds up the process's exit (a pool's workers
are joined at exit). Whoever waits for it waits in short slices, so a stop request is noticed
at once. An abandoned thread that wakes up later finds its clock marked abandoned at its next
hand-over and stops there, before it writes anything more.

Those threads are reused (:func:`run_in_own_thread`): a small job needs three plugin calls, and
starting a thread makes the loop wait until it runs, a burst of small jobs thousands of times.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

_T = TypeVar("_T")

#: How often a waiter looks at the stop flag and the plugin's clock.
WAIT_SLICE_SECONDS = 0.1


#: Idle plugin threads kept for the next call at most, and how long each waits for one before it ends.
SPARE_THREADS = 8
SPARE_IDLE_SECONDS = 30.0


class _SpareThread:
    """A daemon thread that runs one plugin call after another, waiting idle in between."""

    def __init__(self, spares: SpareThreads):
        self._spares = spares
        self.work: queue.SimpleQueue[tuple[Callable[[], Any], str]] = queue.SimpleQueue()

    def serve(self) -> None:
        me = threading.current_thread()
        call = self.work.get()
        while call is not None:
            work, me.name = call
            try:
                work()
            except BaseException:  # noqa: BLE001 - the work reports its own errors; this is a bug
                logging.getLogger("batchd").exception("plugin thread %s failed", me.name)
            me.name = "batchd-plugin-idle"
            call = self._spares.idle(self)


class SpareThreads:
    """Where plugin calls find an idle thread (see :func:`run_in_own_thread`)."""

    def __init__(self, keep: int = SPARE_THREADS, idle_seconds: float = SPARE_IDLE_SECONDS):
        self._keep, self._idle_seconds = keep, idle_seconds
        self._lock = threading.Lock()
        self._idle: list[_SpareThread] = []

    def start(self, work: Callable[[], Any], name: str) -> None:
        with self._lock:
            spare = self._idle.pop() if self._idle else None
        if spare is None:
            spare = _SpareThread(self)
            spare.work.put((work, name))
            threading.Thread(target=spare.serve, name=name, daemon=True).start()
        else:
            spare.work.put((work, name))

    def idle_count(self) -> int:
        """Threads waiting for a call."""
        with self._lock:
            return len(self._idle)

    def idle(self, spare: _SpareThread) -> tuple[Callable[[], Any], str] | None:
        """The spare's next call, or None when it should end (enough are idle, or none came in time)."""
        with self._lock:
            if len(self._idle) >= self._keep:
                return None
            self._idle.append(spare)
        try:
            return spare.work.get(timeout=self._idle_seconds)
        except queue.Empty:
            with self._lock:
                if spare in self._idle:
                    self._idle.remove(spare)
                    return None
            return spare.work.get()  # taken from the idle list just now: its call is on the way


_spares = SpareThreads()


def run_in_own_thread(work: Callable[[], Any], name: str) -> None:
    """Run ``work`` (plugin code) in a daemon thread no other call is using: an idle one left by an
    earlier call, else a new one. A call that never returns keeps its thread; the next takes another."""
    _spares.start(work, name)


class PluginTimeout(Exception):
    """A task plugin kept control longer than ``plugin_timeout_seconds`` in one step."""

    def __init__(self, task: str, plugin: str, step: str, seconds: float):
        self.task, self.plugin, self.step, self.seconds = task, plugin, step, seconds
        super().__init__(
            f"task {task!r} (plugin {plugin!r}) did not return from {step} within plugin_timeout_seconds = "
            f"{seconds:g} s; batchd gave up on it (its thread is left behind)")


class Abandoned(Exception):
    """Raised in a plugin's thread that comes back after batchd gave up on it."""


class PluginClock:
    """Since when a plugin has had control (``None``: batchd's own code is running)."""

    def __init__(self, task: str, plugin: str, step: str):
        self.task, self.plugin, self.step = task, plugin, step
        self.since: float | None = None
        self.abandoned = False

    def overdue(self, timeout: float) -> bool:
        since = self.since
        return since is not None and time.monotonic() - since >= timeout

    def timeout(self, seconds: float) -> PluginTimeout:
        """Give up on the plugin: the error to report (its thread stops at its next hand-over)."""
        self.abandoned = True
        return PluginTimeout(self.task, self.plugin, self.step, seconds)

    def _check(self) -> None:
        if self.abandoned:
            raise Abandoned(f"{self.step} of task {self.task!r} came back after batchd gave up on it")

    def iterate(self, iterable: Iterable[_T]) -> Iterator[_T]:
        """The plugin's items; the time inside each ``next()`` is the plugin's."""
        iterator = iter(iterable)
        while True:
            self.since = time.monotonic()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.since = None
            self._check()
            yield item

    def handing(self, iterable: Iterable[_T]) -> Iterator[_T]:
        """Items handed to the plugin; the time until it asks for the next one is the plugin's."""
        for item in iterable:
            self.since = time.monotonic()
            yield item
            self.since = None
            self._check()
        self.since = time.monotonic()  # the plugin goes on with what it was handed


class InThread:
    """``work()`` in a daemon thread of its own; :meth:`wait` for it with the plugin's clock running."""

    def __init__(self, work: Callable[[], _T], name: str):
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._work = work
        run_in_own_thread(self._run, name)

    def _run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as error:  # noqa: BLE001 - handed to the waiter
            self.error = error
        finally:
            self.done.set()

    def wait(self, clock: PluginClock, timeout: float, stopping: Callable[[], bool], on_stop: Callable[[], Exception]):
        """The work's result (or its exception); ``clock.timeout`` raised when the plugin holds on too long,
        ``on_stop()`` raised when a stop is requested first."""
        while not self.done.wait(WAIT_SLICE_SECONDS):
            if stopping():
                clock.abandoned = True
                raise on_stop()
            if clock.overdue(timeout):
                raise clock.timeout(timeout)
        if self.error is not None:
            raise self.error
        return self.result


_END = object()


class Prefetch:
    """Iterates ``iterable`` in a daemon thread of its own, a few items ahead of its consumer.

    :meth:`take` never blocks (the loop's thread uses it); iterating blocks in short slices,
    ending early when ``stopping()`` and raising :class:`PluginTimeout` when ``clock`` is overdue.
    ``batch`` items at most travel together (or what ``flush_seconds`` gathered), so a long
    stream of small items does not cost a queue hand-over each. ``on_ready`` is called from the
    thread when something can be taken (to wake the loop).
    """

    def __init__(self, iterable: Iterable[Any], clock: PluginClock, *, name: str, ahead: int = 4, batch: int = 1,
                 flush_seconds: float = 0.1, on_ready: Callable[[], None] = lambda: None):
        self.clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._taken: collections.deque = collections.deque()
        self._ended = False
        self._error: BaseException | None = None
        self._closed = False
        self._batch, self._flush_seconds, self._on_ready = batch, flush_seconds, on_ready
        run_in_own_thread(lambda: self._run(iterable), name)

    def _put(self, item: Any) -> bool:
        while not (self._closed or self.clock.abandoned):
            try:
                self._queue.put(item, timeout=WAIT_SLICE_SECONDS)
            except queue.Full:
                continue
            self._on_ready()
            return True
        return False

    def _run(self, iterable: Iterable[Any]) -> None:
        items: list = []
        flushed_at = time.monotonic()
        try:
            for item in iterable:
                items.append(item)
                if len(items) >= self._batch or time.monotonic() - flushed_at >= self._flush_seconds:
                    if not self._put(items):
                        return
                    items, flushed_at = [], time.monotonic()
            if items and not self._put(items):
                return
            self._put((_END, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._put((_END, error))

    def close(self) -> None:
        """Nothing more is wanted: the thread stops at its next item."""
        self._closed = True

    def _fill(self, block: bool) -> None:
        if self._taken or self._ended:
            return
        try:
            got = self._queue.get(block, WAIT_SLICE_SECONDS) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        if isinstance(got, tuple):
            self._ended, self._error = True, got[1]
        else:
            self._taken = collections.deque(got)

    def ready(self) -> bool:
        """Whether :meth:`take` has something: an item, the end or the plugin's error."""
        self._fill(block=False)
        return bool(self._taken) or self._ended

    def take(self) -> tuple[str, Any]:
        """``("item", item)``, ``("end", None)``, ``("error", exception)`` or ``("waiting", None)``."""
        self._fill(block=False)
        if self._taken:
            return "item", self._taken.popleft()
        if self._ended:
            return ("error", self._error) if self._error is not None else ("end", None)
        return "waiting", None

    def iterate(self, timeout: float, stopping: Callable[[], bool]) -> Iterator[Any]:
        """The items, waiting for each (see the class docstring)."""
        try:
            while True:
                self._fill(block=True)
                kind, value = self.take()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                elif kind == "error":
                    raise value
                elif stopping():
                    return
                elif self.clock.overdue(timeout):
                    raise self.clock.timeout(timeout)
        finally:
            self.close()


class OnDemand:
    """Iterates ``iterable`` in a daemon thread of its own, at most ``ahead`` items before the consumer.

    For a job's chunks: the generator only moves when the loop has asked (:meth:`ask`) for more than
    it has taken, so once the loop stops asking it comes to rest at a chunk boundary, where
    :meth:`close` ends it (the build's index then holds exactly the chunks taken). Building a few
    chunks ahead lets the loop take several in one visit while it is busy elsewhere. :meth:`take`
    never blocks; ``on_ready`` is called from the thread when an answer is there (to wake the loop).
    """

    def __init__(self, iterable: Iterable[Any], clock: PluginClock, *, name: str,
                 on_ready: Callable[[], None] = lambda: None, source: Iterator[Any] | None = None,
                 ahead: int = 1):
        """``source``: a generator ``iterable`` draws from, closed in the thread when the iteration ends
        (an error's traceback would otherwise keep it suspended until another thread frees it, and
        its cleanup, such as closing an SQLite connection, must run in the thread that made it)."""
        self.clock = clock
        self._source = source
        #: The item taken last (the loop's view of where the generator rests).
        self.last: Any = None
        self._iterator = iter(iterable)
        self._ahead = max(1, ahead)
        self._lock = threading.Lock()
        self._answers: collections.deque[tuple[str, Any]] = collections.deque()  # built, not yet taken
        self._asked = 0  # items asked for and not yet started (under the lock)
        self._building = False  # an item is being built (under the lock)
        self._wake = threading.Event()
        self._closing = False
        self._finished = threading.Event()
        self._on_ready = on_ready
        self._name = name
        run_in_own_thread(self._run, name)

    def _run(self) -> None:
        try:
            while True:
                while not self._closing:
                    with self._lock:
                        if self._asked:
                            self._asked -= 1
                            self._building = True
                            break
                    self._wake.wait(WAIT_SLICE_SECONDS * 10)
                    self._wake.clear()  # an ask made meanwhile is seen by the count above
                if self._closing:
                    self._iterator.close()  # resting at a boundary: its cleanup runs here
                    return
                try:
                    answer: tuple[str, Any] = ("item", next(self._iterator))
                except StopIteration:
                    answer = ("end", None)
                except BaseException as error:  # noqa: BLE001 - handed to the consumer
                    answer = ("error", error)
                with self._lock:
                    self._answers.append(answer)
                    self._building = False
                self._on_ready()
                if answer[0] != "item":
                    return
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - already failed or finished; nothing to add
                    pass
            self._finished.set()

    def ask(self, most: int | None = None) -> None:
        """Let the generator run until ``ahead`` items (or ``most``, if fewer) wait to be taken; a no-op
        when they already do."""
        with self._lock:
            ahead = self._ahead if most is None else min(most, self._ahead)
            wanted = ahead - self._asked - self._building - len(self._answers)
            if wanted <= 0 or self._answers and self._answers[-1][0] != "item":
                return
            self._asked += wanted
        self._wake.set()

    def withdraw(self) -> None:
        """Ask for nothing more: the item being built is the last (a cancel stops the build there)."""
        with self._lock:
            self._asked = 0

    def ready(self) -> bool:
        """Whether :meth:`take` has an answer to give now."""
        with self._lock:
            return bool(self._answers)

    def resting(self) -> bool:
        """Whether the generator rests just after the item taken last (nothing asked, nothing waiting)."""
        with self._lock:
            return not self._asked and not self._building and not self._answers

    def take(self) -> tuple[str, Any]:
        """``("item", item)``, ``("end", None)``, ``("error", exception)`` or ``("waiting", None)`` (nothing
        built yet; :meth:`ask` for it). A thread that ended without answering what was asked (a bug in
        batchd, not the plugin's) is an error, not a wait that never ends."""
        ended = self._finished.is_set()  # read first: an answer is always queued before the thread ends
        with self._lock:
            if self._answers:
                answer = self._answers[0]
                if answer[0] != "item":
                    return answer  # the end and an error stay the answer
                self._answers.popleft()
                self.last = answer[1]
                return answer
            if ended and (self._asked or self._building):
                error = RuntimeError(f"{self._name} ended without answering")
                self._answers.append(("error", error))
                return "error", error
        return "waiting", None

    def close(self, *, wait: bool = False) -> None:
        """End the iteration: at once when it rests (``wait``: until its cleanup has run), else the
        thread stops when its current item is done (a hung plugin's thread is simply left behind)."""
        self._closing = True
        self.clock.abandoned = True
        with self._lock:
            idle = not self._asked and not self._building  # the thread waits to be asked
        if idle:
            self._wake.set()
            if wait:
                self._finished.wait()
