"""The daemon's one inotify instance (watch.Watcher), shared by every resource's device-plugin
directory and the configuration directory: real directories, real events."""

import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.daemon import short_tempdir
from token_resource import watch

flags = watch.flags
Events = queue.Queue[tuple[str, int]]


@pytest.fixture
def watcher() -> Iterator[watch.Watcher]:
    w = watch.Watcher()
    yield w
    w.close()


@pytest.fixture
def directories() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(short_tempdir())
        return made[-1]

    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def subscribe(watcher: watch.Watcher, directory: str, mask: int) -> tuple[watch.Subscription, Events]:
    events: Events = queue.Queue()
    return watcher.subscribe(directory, mask, lambda name, m: events.put((name, m))), events


def touch(directory: str, name: str) -> None:
    with open(os.path.join(directory, name), "w"):
        pass


def next_name(events: Events) -> str:
    return events.get(timeout=5)[0]


def inotify_fds() -> list[str]:
    """This process's inotify descriptors."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                fds.append(fd)
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return fds


def kernel_watches(fd: str) -> int:
    """How many watches the kernel holds on inotify descriptor `fd` (one per inode)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return sum(line.startswith("inotify wd:") for line in f)


def test_one_inotify_instance_serves_every_subscription(directories: Callable[[], str]) -> None:
    before = inotify_fds()
    watcher = watch.Watcher()
    try:
        plugins, config = directories(), directories()
        for directory, mask in [(plugins, flags.CREATE), (plugins, flags.DELETE), (plugins, flags.CREATE)]:
            watcher.subscribe(directory, mask, lambda name, m: None)
        watcher.subscribe(config, flags.CLOSE_WRITE | flags.MOVED_TO, lambda name, m: None)
        (fd,) = set(inotify_fds()) - set(before)  # one instance however many subscriptions
        assert kernel_watches(fd) == 2  # one watch per directory, shared by its subscribers
    finally:
        watcher.close()
    assert inotify_fds() == before


def test_each_subscriber_gets_the_events_it_asked_for(watcher: watch.Watcher, directories: Callable[[], str]) -> None:
    directory = directories()
    _, creates = subscribe(watcher, directory, flags.CREATE)
    _, deletes = subscribe(watcher, directory, flags.DELETE)
    touch(directory, "a")
    os.unlink(os.path.join(directory, "a"))
    touch(directory, "b")
    assert creates.get(timeout=5) == ("a", flags.CREATE)
    assert next_name(creates) == "b"  # the DELETE of "a" came between: not given to this subscriber
    assert deletes.get(timeout=5) == ("a", flags.DELETE)
    os.unlink(os.path.join(directory, "b"))
    assert next_name(deletes) == "b"  # no CREATE in between


def test_events_go_to_the_subscribers_of_their_directory(
    watcher: watch.Watcher, directories: Callable[[], str]
) -> None:
    first, second = directories(), directories()
    _, in_first = subscribe(watcher, first, flags.CREATE)
    _, in_second = subscribe(watcher, second, flags.CREATE)
    touch(second, "x")
    touch(first, "y")
    touch(second, "z")
    assert [next_name(in_second), next_name(in_second)] == ["x", "z"]
    assert next_name(in_first) == "y"
    assert in_first.empty()  # "z" was delivered after "y": this subscriber had its chance


def test_an_unsubscribed_callback_hears_nothing_more(watcher: watch.Watcher, directories: Callable[[], str]) -> None:
    directory = directories()
    gone, gone_events = subscribe(watcher, directory, flags.CREATE)
    _, staying = subscribe(watcher, directory, flags.CREATE)
    watcher.unsubscribe(gone)
    touch(directory, "a")
    touch(directory, "b")
    assert [next_name(staying), next_name(staying)] == ["a", "b"]
    assert gone_events.empty()  # callbacks run in order on one thread: "a" is long delivered


def test_the_last_unsubscribe_removes_the_kernel_watch(directories: Callable[[], str]) -> None:
    before = set(inotify_fds())
    watcher = watch.Watcher()
    try:
        (fd,) = set(inotify_fds()) - before
        directory = directories()
        first, _ = subscribe(watcher, directory, flags.CREATE)
        second, _ = subscribe(watcher, directory, flags.DELETE)
        watcher.unsubscribe(first)
        assert kernel_watches(fd) == 1
        watcher.unsubscribe(second)
        assert kernel_watches(fd) == 0
        _, again = subscribe(watcher, directory, flags.CREATE)  # and a new subscription works
        touch(directory, "a")
        assert next_name(again) == "a"
    finally:
        watcher.close()


@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_a_directory_going_away_is_told_to_all_its_subscribers(
    watcher: watch.Watcher, directories: Callable[[], str], how: str
) -> None:
    directory, other = directories(), directories()
    _, creates = subscribe(watcher, directory, flags.CREATE)
    _, deletes = subscribe(watcher, directory, flags.DELETE)
    _, elsewhere = subscribe(watcher, other, flags.CREATE)
    if how == "removed":
        os.rmdir(directory)
    else:
        os.rename(directory, os.path.join(other, "moved"))  # MOVED_TO in `other`: not asked for
    for events in (creates, deletes):
        name, mask = events.get(timeout=5)
        assert mask & watch.GONE and name == ""
    touch(other, "a")
    assert next_name(elsewhere) == "a"  # the other directory's watch goes on


def test_a_directory_recreated_at_the_same_path_can_be_watched_again(
    watcher: watch.Watcher, directories: Callable[[], str]
) -> None:
    directory = directories()
    _, old = subscribe(watcher, directory, flags.CREATE)
    os.rmdir(directory)
    while not old.get(timeout=5)[1] & flags.IGNORED:  # the kernel dropped the watch
        pass
    os.mkdir(directory)
    _, new = subscribe(watcher, directory, flags.CREATE)
    touch(directory, "a")
    assert next_name(new) == "a"
    assert old.empty()  # the old subscription belonged to the removed directory


def test_subscribing_to_a_missing_directory_raises(watcher: watch.Watcher, directories: Callable[[], str]) -> None:
    with pytest.raises(FileNotFoundError):
        watcher.subscribe(os.path.join(directories(), "missing"), flags.CREATE, lambda name, m: None)


def test_close_ends_the_thread() -> None:
    before = threading.active_count()
    watcher = watch.Watcher()
    assert threading.active_count() == before + 1
    watcher.close()
    assert threading.active_count() == before
