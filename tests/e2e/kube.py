"""kubectl helpers shared by the end-to-end scripts in tests/e2e (standard library only).

- Kubectl: runs kubectl (with --kubeconfig) and decodes JSON;
- poll: bounded polling with a timeout that says what was last seen;
- Watch: a `kubectl get -w -o json` stream in a background thread, for event-based waits;
- parse_time / cri_log_times: Kubernetes and CRI log timestamps as epoch seconds.
"""

import calendar
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class CheckFailedError(Exception):
    """A check that did not hold; the message says what was expected and what was seen."""


class Kubectl:
    def __init__(self, binary: str, kubeconfig: str | None):
        self.base = [binary] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])

    def run(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            [*self.base, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise CheckFailedError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "-o", "json"))


def poll(what: str, timeout: float, probe: Callable[[], tuple[T | None, object]], interval: float = 0.5) -> T:
    """Calls probe() until it returns something truthy; CheckFailedError with its last answer after timeout.

    probe returns (value, detail): value truthy means done; detail describes the state seen."""
    deadline = time.monotonic() + timeout
    while True:
        value, detail = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailedError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {detail}")
        time.sleep(interval)


_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)")


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp (API objects: whole seconds; CRI logs: nanoseconds)."""
    if not text:
        return None
    match = _TIME.match(text)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    seconds: float = calendar.timegm((int(year), int(month), int(day), int(hour), int(minute), int(second)))
    seconds += float(fraction) if fraction else 0.0
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def cri_log_lines(text: str) -> list[tuple[float, str]]:
    """(epoch seconds, message) of each line of a CRI container log (`TIME STREAM TAG MESSAGE`),
    or of `kubectl logs --timestamps` output (`TIME MESSAGE`)."""
    lines = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        when = parse_time(parts[0])
        if when is None:
            continue
        if len(parts) == 4 and parts[1] in ("stdout", "stderr"):
            lines.append((when, parts[3]))
        else:
            lines.append((when, line.split(" ", 1)[1] if " " in line else ""))
    return lines


class Watch:
    """`kubectl get ARGS -w --output-watch-events -o json` in a background thread:
    on_event(seen_at, type, object) for the initial list (ADDED) and every change (MODIFIED,
    DELETED), in order; restarted if the stream ends (the API server closes watches after a
    while). `changed` (shareable between watches) is notified after each event."""

    def __init__(
        self,
        kubectl: Kubectl,
        args: list[str],
        on_event: Callable[[float, str, dict], None],
        changed: threading.Condition | None = None,
    ):
        self.kubectl = kubectl
        self.args = args
        self.on_event = on_event
        self.stopped = threading.Event()
        self.process: subprocess.Popen | None = None
        self.changed = changed or threading.Condition()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"watch {' '.join(args)}")
        self.thread.start()

    def _run(self) -> None:
        decoder = json.JSONDecoder()
        while not self.stopped.is_set():
            self.process = subprocess.Popen(
                [*self.kubectl.base, "get", *self.args, "-w", "--output-watch-events", "-o", "json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            buffer = ""
            assert self.process.stdout is not None
            while True:
                chunk = self.process.stdout.readline()
                if not chunk:
                    break
                buffer += chunk
                while True:
                    stripped = buffer.lstrip()
                    if not stripped:
                        buffer = ""
                        break
                    try:
                        obj, end = decoder.raw_decode(stripped)
                    except json.JSONDecodeError:
                        buffer = stripped
                        break
                    buffer = stripped[end:]
                    seen = time.time()
                    if "object" in obj and "type" in obj:
                        self.on_event(seen, obj["type"], obj["object"])
                    else:
                        for item in obj.get("items", []) if obj.get("kind", "").endswith("List") else [obj]:
                            self.on_event(seen, "ADDED", item)
                    with self.changed:
                        self.changed.notify_all()
            self.process.wait()
            if not self.stopped.is_set():
                assert self.process.stderr is not None
                error = self.process.stderr.read().strip()
                if error:
                    self.errors.append(error)
                self.stopped.wait(1)

    def wait_for(
        self, what: str, timeout: float, probe: Callable[[], tuple[T | None, object]], recheck: float = 1.0
    ) -> T:
        """Like poll(), but woken by the watch's events (and every `recheck` seconds for probes
        that depend on the clock or on something else)."""
        deadline = time.monotonic() + timeout
        while True:
            value, detail = probe()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailedError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {detail}")
            with self.changed:
                self.changed.wait(min(left, recheck))

    def stop(self) -> None:
        self.stopped.set()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
