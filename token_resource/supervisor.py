"""The daemon's resources as a whole: one PluginRunner thread per resource, live
reconfiguration from the configuration file (on change or SIGHUP), and the order of a stop.

A reload is all or nothing: a file that does not parse or validate leaves the configuration in
force untouched, is logged once, and shows in /readyz and the metrics until a good one comes.
A new count reaches its runner as one new policy (the runner owns it). A resource that cannot
serve (its socket is held by another process, say) is retried by its runner and reported in
/readyz meanwhile, while the others go on.

On stop, resources this instance holds with the kubelet (not those a newer instance has taken
over) are first withheld from the scheduler (`Withholder`, see drain.py), then every runner
stops serving, then the withholding is sealed.

A reload that lowers what the kubelet is told is the same, resource by resource: a new snapshot
lowers the kubelet's view at once but the node status the scheduler reads only at the kubelet's
next status update (10 s), and pods bound meanwhile would fail admission. So a lower count of a
held resource is first withheld down to the new count (a removed resource down to 0: it is a
stop for that resource), which returns once the pods already bound have been admitted from the
old snapshot (at most the drain timeout); then the runners apply the new configuration, and
once each has published it the withholding is sealed. An increase, and a resource this instance
does not hold (never registered, or STANDBY), apply at once as before; so does everything when
the withholding cannot work (no API access: it logs why and returns).
"""

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from absl import logging

from token_resource import config, metrics, watch
from token_resource.config import ConfigError, PluginConfig
from token_resource.lifecycle import Phase, PluginRunner, PolicyChanged, RunnerStatus
from token_resource.plugin_server import CannotServeError
from token_resource.policy import DevicePolicy

# The policy for a resource's configuration, given the policy it replaces (None at first).
PolicyFactory = Callable[[PluginConfig, DevicePolicy | None], DevicePolicy]


# How long a reload waits for a runner to publish the lower count before it seals anyway (a
# runner handles events in milliseconds; this bounds a wedged one).
PUBLISH_TIMEOUT_S = 2.0


class Withholder(Protocol):
    """Lowers the scheduler's view of this node's resources (resource -> quantity: 0 for a stop,
    the new count for a decrease) before the kubelet's is, so no new pod is bound beyond it
    (drain.NodeDrain). Both never raise."""

    def withhold(self, quantities: Mapping[str, int]) -> object:
        """While the plugin still serves the higher count: returns once no pod is on its way to
        the kubelet (bounded by the drain timeout)."""

    def seal(self, quantities: Mapping[str, int]) -> object:
        """After the plugin stopped serving the higher count (stream ended, or lower count published)."""


@dataclasses.dataclass
class _Running:
    plugin: PluginConfig
    policy: DevicePolicy
    runner: PluginRunner
    thread: threading.Thread


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """Where the configuration comes from when it is a file."""

    path: str
    placement: config.Placement
    node_name: str | None

    def load(self) -> tuple[str, tuple[PluginConfig, ...]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as error:
            raise ConfigError(f"cannot read it: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"not UTF-8 text (byte {error.start})") from None
        return text, config.parse_config(text, self.placement, self.node_name)


_STOP = "stop"
_RELOAD = "reload"


class Supervisor:
    """Runs the configured plugins until stop(); reloads the file on reload() or change."""

    def __init__(
        self,
        plugins: tuple[PluginConfig, ...],
        policy_for: PolicyFactory,
        *,
        instance: int,
        source: ConfigFile | None = None,
        source_text: str = "",
        list_and_watch_timeout_s: float = 20.0,
        withholder: Withholder | None = None,
    ) -> None:
        self._initial = plugins
        self._policy_for = policy_for
        self._instance = instance
        self._source = source
        self._text_in_force = source_text
        self._list_and_watch_timeout_s = list_and_watch_timeout_s
        self._withholder = withholder
        self._events: queue.Queue[str] = queue.Queue()
        self._running: dict[str, _Running] = {}
        self._crashed: set[str] = set()
        self._lock = threading.Lock()
        self._watcher: watch.Watcher | None = None
        self.generation = 1
        self.reload_error: str | None = None

    def stop(self) -> None:
        self._events.put(_STOP)

    def reload(self) -> None:
        self._events.put(_RELOAD)

    def run(self) -> None:
        """Serves until stop(). Raises CannotServeError if the configuration cannot be watched."""
        metrics.CONFIG_GENERATION.set(self.generation)
        metrics.CONFIG_LAST_RELOAD_OK.set(1)
        self._watcher = watch.Watcher()
        try:
            self._watch_config(self._watcher)
            self._apply(self._initial)
            while (event := self._events.get()) != _STOP:
                if event == _RELOAD:
                    self._reload()
            held = self._held()
            if held and self._withholder is not None:
                stopped = dict.fromkeys(held, 0)
                self._withholder.withhold(stopped)
                self._apply(())
                self._withholder.seal(stopped)
        finally:
            self._apply(())
            self._watcher.close()

    def statuses(self) -> dict[str, RunnerStatus]:
        with self._lock:
            running = dict(self._running)
            crashed = set(self._crashed)
        return {
            name: RunnerStatus(Phase.STOPPED, problem="its event loop failed (see the log)")
            if name in crashed
            else r.runner.status()
            for name, r in running.items()
        }

    def plugins(self) -> tuple[PluginConfig, ...]:
        """The configuration in force, resource by resource."""
        with self._lock:
            return tuple(r.plugin for r in self._running.values())

    # Configuration ---------------------------------------------------------------------------

    def _watch_config(self, watcher: watch.Watcher) -> None:
        if self._source is None:
            return
        # A mounted ConfigMap changes by swapping the ..data symlink (MOVED_TO in the directory);
        # an edited file is closed after writing. Either way the content decides.
        directory = os.path.dirname(os.path.abspath(self._source.path))
        try:
            watcher.subscribe(
                directory,
                watch.flags.CLOSE_WRITE | watch.flags.MOVED_TO,
                lambda name, mask: self._events.put(_RELOAD),
            )
        except OSError as error:  # e.g. the node's inotify limits, shared by all its pods
            raise CannotServeError(f"cannot watch {directory} for configuration changes: {error.strerror}") from None

    def _reload(self) -> None:
        if self._source is None:
            logging.info("SIGHUP: no --config to reload")
            return
        try:
            text, plugins = self._source.load()
        except ConfigError as error:
            self._reject(str(error))
            return
        except Exception as error:  # a parser surprise must not take the running config down
            logging.exception("reading %s failed unexpectedly", self._source.path)
            self._reject(f"unexpected {type(error).__name__}: {error}")
            return
        if text == self._text_in_force:
            if self.reload_error is not None:
                self._accept_unchanged()
            return
        self._text_in_force = text
        self.reload_error = None
        self.generation += 1
        metrics.CONFIG_RELOADS.labels("ok").inc()
        metrics.CONFIG_GENERATION.set(self.generation)
        metrics.CONFIG_LAST_RELOAD_OK.set(1)
        logging.info("configuration generation %d from %s: %s", self.generation, self._source.path, _summary(plugins))
        self._reconfigure(plugins)

    def _reject(self, reason: str) -> None:
        if reason == self.reload_error:
            return  # the same bad file again: said once already
        self.reload_error = reason
        metrics.CONFIG_RELOADS.labels("failed").inc()
        metrics.CONFIG_LAST_RELOAD_OK.set(0)
        logging.error("configuration rejected, generation %d stays in force: %s", self.generation, reason)

    def _accept_unchanged(self) -> None:
        """The file is back to the configuration in force: the error is over."""
        self.reload_error = None
        metrics.CONFIG_LAST_RELOAD_OK.set(1)
        logging.info("configuration file is back to generation %d", self.generation)

    # Runners ---------------------------------------------------------------------------------

    def _reconfigure(self, plugins: tuple[PluginConfig, ...]) -> None:
        """_apply(plugins), with what it lowers withheld from the scheduler around it (see the
        module docstring)."""
        lowered = self._lowered(plugins) if self._withholder is not None else {}
        if not lowered or self._withholder is None:
            self._apply(plugins)
            return
        self._withholder.withhold(lowered)
        _await_taken(self._apply(plugins))
        self._withholder.seal(lowered)

    def _lowered(self, plugins: tuple[PluginConfig, ...]) -> dict[str, int]:
        """The held resources whose count `plugins` lowers: resource -> the new count (0 if removed)."""
        wanted = {p.resource: p for p in plugins}
        lowered = {}
        for name in self._held():
            new, old = wanted.get(name), self._running[name].plugin
            if new is None:
                lowered[name] = 0
            elif new.count < old.count:
                lowered[name] = new.count
        return lowered

    def _apply(self, plugins: tuple[PluginConfig, ...]) -> list[threading.Event]:
        """Starts, stops and reconfigures runners to serve `plugins`. Returns, for each new
        policy it handed to a running runner, the event the runner sets once it has taken it."""
        taken: list[threading.Event] = []
        wanted = {p.resource: p for p in plugins}
        for name, running in list(self._running.items()):
            new = wanted.get(name)
            if new is None or new.endpoint != running.plugin.endpoint:
                self._withdraw(name)  # a moved socket is a new registration
        for name, plugin in wanted.items():
            current = self._running.get(name)
            if current is None:
                self._start(plugin)
            elif current.plugin != plugin:
                logging.info("%s: count %d -> %d", name, current.plugin.count, plugin.count)
                policy = self._policy_for(plugin, current.policy)
                with self._lock:
                    current.plugin, current.policy = plugin, policy
                taken.append(threading.Event())
                current.runner.post(PolicyChanged(policy, taken[-1]))
        return taken

    def _start(self, plugin: PluginConfig) -> None:
        policy = self._policy_for(plugin, None)
        runner = PluginRunner(
            plugin.endpoint,
            policy,
            instance=self._instance,
            watcher=self._watcher,
            list_and_watch_timeout_s=self._list_and_watch_timeout_s,
        )
        thread = threading.Thread(target=self._run, args=(runner,), name=f"plugin {plugin.resource}", daemon=True)
        with self._lock:
            self._running[plugin.resource] = _Running(plugin, policy, runner, thread)
        thread.start()

    def _run(self, runner: PluginRunner) -> None:
        try:
            runner.run()
        except Exception:  # a bug: /healthz reports it, so the liveness probe restarts the pod
            logging.exception("%s: the plugin's event loop failed", runner.endpoint.resource)
            with self._lock:
                self._crashed.add(runner.endpoint.resource)

    def _withdraw(self, name: str) -> None:
        with self._lock:
            running = self._running.pop(name)
            self._crashed.discard(name)
        running.runner.stop()
        running.thread.join()
        metrics.forget(name)

    def _held(self) -> list[str]:
        """The resources the kubelet knows from this instance: not those it never registered,
        nor those a newer instance took over (withholding those would hide the newer one's)."""
        return [
            name
            for name, status in self.statuses().items()
            if status.phase in (Phase.REGISTERED, Phase.AWAITING_STREAM)
        ]


def _await_taken(taken: list[threading.Event]) -> None:
    """Until each runner has taken its new policy (its open stream then has the new snapshot).
    Bounded: a wedged runner is not a reason to keep withholding (the seal is only the last
    re-apply)."""
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    if not all(event.wait(max(0.0, deadline - time.monotonic())) for event in taken):
        logging.warning("a runner did not take its new count within %.0fs", PUBLISH_TIMEOUT_S)


def _summary(plugins: tuple[PluginConfig, ...]) -> str:
    return ", ".join(f"{p.resource}={p.count}" for p in plugins)
