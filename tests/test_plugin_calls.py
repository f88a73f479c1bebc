"""batchd.plugin_calls: plugin code in threads of its own, waited for with a bound (no daemon here)."""

from __future__ import annotations

import threading

import pytest

from batchd.plugin_calls import InThread, OnDemand, PluginClock, PluginTimeout, Prefetch, SpareThreads
from batchd.testing import Workspace

FOREVER = threading.Event()  # never set: what a hung plugin waits on


def hangs_after(n: int):
    yield from range(n)
    FOREVER.wait()


def test_prefetch_hands_over_every_item_in_order_then_gives_up_on_a_plugin_that_hangs():
    clock = PluginClock("stuck", "hanging", "requests()")
    feed = Prefetch(clock.iterate(hangs_after(2500)), clock, name="test-prefetch", batch=1000)
    seen = []
    with pytest.raises(PluginTimeout) as raised:
        for item in feed.iterate(timeout=0.5, stopping=lambda: False):
            seen.append(item)
    # Handed over in order, in batches of at most 1000 (or what 0.1 s gathered): the batch the plugin
    # hung in the middle of never comes, so more than the last 1000 are never missing.
    assert seen == list(range(len(seen))) and len(seen) > 1500
    assert (raised.value.task, raised.value.plugin, raised.value.step) == ("stuck", "hanging", "requests()")
    assert "plugin_timeout_seconds = 0.5 s" in str(raised.value) and clock.abandoned


def test_prefetch_ends_early_when_a_stop_is_requested():
    clock = PluginClock("stuck", "hanging", "requests()")
    stop = threading.Event()
    feed = Prefetch(clock.iterate(hangs_after(3)), clock, name="test-prefetch")
    seen = []
    for item in feed.iterate(timeout=3600, stopping=stop.is_set):
        seen.append(item)
        if len(seen) == 3:
            stop.set()
    assert seen == [0, 1, 2]


def test_prefetch_passes_the_plugins_own_error_on():
    def broken():
        yield 1
        raise ValueError("bad row")

    clock = PluginClock("t", "p", "requests()")
    with pytest.raises(ValueError, match="bad row"):
        list(Prefetch(clock.iterate(broken()), clock, name="test-prefetch").iterate(60, lambda: False))


def test_on_demand_moves_only_when_asked_and_closes_at_the_item_taken_last(workspace: Workspace):
    produced, cleaned_up = [], threading.Event()
    ready = threading.Event()

    def chunks():
        try:
            for n in range(10):
                produced.append(n)
                yield n
        finally:
            cleaned_up.set()

    clock = PluginClock("t", "p", "requests()")
    feed = OnDemand(chunks(), clock, name="test-on-demand", on_ready=ready.set)
    assert feed.take() == ("waiting", None) and feed.resting() and not produced  # nothing asked: nothing built
    feed.ask()
    assert not feed.resting()
    workspace.wait_for(ready.is_set, what="the first item")
    assert feed.ready()
    assert feed.take() == ("item", 0) and feed.last == 0 and feed.resting()
    assert not feed.ready()  # the next item is the consumer's to ask for
    ready.clear()
    feed.ask()
    feed.ask()  # asked twice, built once: one item ahead at most
    workspace.wait_for(ready.is_set, what="the second item")
    assert feed.take() == ("item", 1)
    assert feed.take() == ("waiting", None)
    feed.close(wait=True)
    assert cleaned_up.is_set()
    assert produced == [0, 1], "nothing was built beyond what was asked for"


def test_on_demand_runs_ahead_as_far_as_asked_and_hands_items_over_in_order(workspace: Workspace):
    produced = []

    def chunks():
        for n in range(10):
            produced.append(n)
            yield n

    clock = PluginClock("t", "p", "requests()")
    feed = OnDemand(chunks(), clock, name="test-on-demand-ahead", ahead=3)
    feed.ask()
    workspace.wait_for(lambda: len(produced) == 3, what="three items built ahead")
    threading.Event().wait(0.05)
    assert produced == [0, 1, 2], "it built more than three ahead"
    assert [feed.take(), feed.take()] == [("item", 0), ("item", 1)] and feed.last == 1
    assert not feed.resting()  # item 2 waits to be taken
    feed.ask()  # two more, so three wait again
    workspace.wait_for(lambda: len(produced) == 5, what="two more items")
    taken = [feed.take() for _ in range(3)]
    assert taken == [("item", 2), ("item", 3), ("item", 4)] and feed.resting()
    feed.close(wait=True)
    assert produced == [0, 1, 2, 3, 4]


def test_in_thread_times_out_a_plugin_holding_a_handed_item(workspace: Workspace):
    clock = PluginClock("brooding", "hanging", "organize()")

    def organize(results):
        for n, result in enumerate(results):
            if n == 1:
                FOREVER.wait()
            yield result

    written = []

    def work():
        for entry in clock.iterate(organize(clock.handing(iter(range(5))))):
            written.append(entry)
        return len(written)

    with pytest.raises(PluginTimeout, match="organize\\(\\)"):
        InThread(work, name="test-organize").wait(clock, 0.5, lambda: False, RuntimeError)
    assert written == [0]
    # A plugin that returns in time: its result.
    quick = PluginClock("t", "p", "organize()")
    assert InThread(lambda: sum(quick.iterate(quick.handing(range(4)))), name="test-quick").wait(
        quick, 60, lambda: False, RuntimeError) == 6


def _ran_in(spares: SpareThreads, work=lambda: None) -> threading.Thread:
    """The thread ``spares`` ran ``work`` in (waits until it ran)."""
    ran, where = threading.Event(), []

    def call() -> None:
        where.append(threading.current_thread())
        work()
        ran.set()

    spares.start(call, "batchd-test-call")
    assert ran.wait(10)
    return where[0]


def test_plugin_calls_reuse_an_idle_thread_and_a_hung_one_is_replaced():
    spares = SpareThreads(keep=2, idle_seconds=10)
    first = _ran_in(spares)
    # The first call's thread goes idle just after its work: the next call waits for it there.
    for _ in range(1000):
        if spares.idle_count():
            break
        threading.Event().wait(0.01)
    assert _ran_in(spares) is first, "an idle thread was not reused"

    hang, started, hung = threading.Event(), threading.Event(), []
    spares.start(lambda: (hung.append(threading.current_thread()), started.set(), hang.wait()), "batchd-test-hang")
    assert started.wait(10)
    assert _ran_in(spares) is not hung[0], "a call was handed to the thread of a call that has not returned"
    hang.set()


def test_idle_plugin_threads_end_after_their_wait_and_only_a_few_are_kept():
    spares = SpareThreads(keep=1, idle_seconds=0.2)
    gate = threading.Event()
    threads = []
    for _ in range(3):  # three calls at once: three threads, one kept idle afterwards
        started = threading.Event()
        spares.start(lambda started=started: (threads.append(threading.current_thread()), started.set(), gate.wait()),
                     "batchd-test-busy")
        assert started.wait(10)
    assert len(set(threads)) == 3
    gate.set()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "idle threads did not end"


def test_on_demand_survives_an_item_taken_while_it_announces_it(workspace: Workspace):
    """The loop may take an item the moment it is set, before ``on_ready`` returns (a tick already
    under way): the thread must not read the answer back. It once did, died, and left its job
    ``building`` for ever."""
    clock = PluginClock("t", "p", "requests()")
    taken: list = []
    feed: OnDemand

    def take_at_once() -> None:  # the consumer, as fast as it can be
        taken.append(feed.take())

    feed = OnDemand(iter(range(3)), clock, name="test-on-demand-race", on_ready=take_at_once)
    for expected in range(3):
        assert feed.take() == ("waiting", None)
        feed.ask()
        workspace.wait_for(lambda: len(taken) > expected, what=f"item {expected}")
        assert taken[-1] == ("item", expected)
    assert feed.take() == ("waiting", None)
    feed.ask()
    workspace.wait_for(lambda: taken[-1] == ("end", None), what="the end")
    assert feed.take() == ("end", None), "the end stays the answer"


def test_on_demand_whose_thread_died_answers_an_error_not_waiting_for_ever(workspace: Workspace):
    clock = PluginClock("t", "p", "requests()")
    calls = []

    def broken_on_ready() -> None:  # a bug in batchd's own callback kills the thread
        calls.append(1)
        raise RuntimeError("a bug")

    feed = OnDemand(iter(range(3)), clock, name="test-on-demand-dies", on_ready=broken_on_ready)
    feed.ask()
    workspace.wait_for(lambda: calls, what="the first answer")
    assert feed.take() == ("item", 0)
    feed.ask()  # nobody is left to answer
    kind, error = workspace.wait_for(lambda: (answer := feed.take())[0] != "waiting" and answer,
                                     what="the dead thread noticed")
    assert kind == "error" and "ended without answering" in str(error)
