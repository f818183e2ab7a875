"""The daemon's resources as a whole: one PluginRunner thread per resource, and live
reconfiguration from the configuration file (on change or SIGHUP).

A reload is all or nothing: a file that does not parse or validate leaves the configuration in
force untouched, is logged once, and shows in /readyz and the metrics until a good one comes.
A resource that cannot serve (its socket is taken, say) is reported the same way while the
others go on; the daemon exits only when none of its resources can serve.
"""

import dataclasses
import os
import queue
import threading

from absl import logging

from token_resource import config, metrics, watch
from token_resource.config import ConfigError, PluginConfig
from token_resource.lifecycle import CannotServeError, PluginRunner, RunnerStatus
from token_resource.tokens import TokenPolicy


@dataclasses.dataclass
class _Running:
    plugin: PluginConfig
    policy: TokenPolicy
    runner: PluginRunner
    thread: threading.Thread


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """Where the configuration comes from when it is a file."""

    path: str
    plugin_dir: str
    node_name: str | None

    def load(self) -> tuple[str, tuple[PluginConfig, ...]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as error:
            raise ConfigError(f"cannot read it: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"not UTF-8 text (byte {error.start})") from None
        return text, config.parse_config(text, self.plugin_dir, self.node_name)


_STOP = "stop"
_RELOAD = "reload"
_PLUGIN_FAILED = "a plugin cannot serve"


class Supervisor:
    """Runs the configured plugins until stop(); reloads the file on reload() or change."""

    def __init__(
        self,
        plugins: tuple[PluginConfig, ...],
        source: ConfigFile | None = None,
        source_text: str = "",
        list_and_watch_timeout_s: float = 20.0,
    ) -> None:
        self._initial = plugins
        self._source = source
        self._text_in_force = source_text
        self._list_and_watch_timeout_s = list_and_watch_timeout_s
        self._events: queue.Queue = queue.Queue()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._failures: dict[str, str] = {}  # resource -> why it cannot serve
        self.generation = 1
        self.reload_error: str | None = None

    def stop(self) -> None:
        self._events.put(_STOP)

    def reload(self) -> None:
        self._events.put(_RELOAD)

    def run(self) -> None:
        """Serves until stop(); raises CannotServeError when no resource can serve."""
        metrics.CONFIG_GENERATION.set(self.generation)
        metrics.CONFIG_LAST_RELOAD_OK.set(1)
        config_watch = self._watch_config()
        try:
            self._apply(self._initial)
            while True:
                event = self._events.get()
                if event == _STOP:
                    return
                if event == _RELOAD:
                    self._reload()
                with self._lock:
                    if self._failures and len(self._failures) == len(self._running):
                        raise CannotServeError("; ".join(self._failures.values()))
        finally:
            if config_watch is not None:
                config_watch.close()
            self._apply(())

    def statuses(self) -> dict[str, RunnerStatus]:
        with self._lock:
            running = dict(self._running)
            failures = dict(self._failures)
        return {
            name: RunnerStatus(serving=False, registered=False, error=failures[name])
            if name in failures
            else r.runner.status()
            for name, r in running.items()
        }

    # Configuration ---------------------------------------------------------------------------

    def _watch_config(self) -> watch.DirectoryEvents | None:
        if self._source is None:
            return None
        # A mounted ConfigMap changes by swapping the ..data symlink (MOVED_TO in the directory);
        # an edited file is closed after writing. Either way the content decides.
        directory = os.path.dirname(os.path.abspath(self._source.path))
        try:
            return watch.DirectoryEvents(
                directory,
                watch.flags.CLOSE_WRITE | watch.flags.MOVED_TO,
                lambda name, mask: self._events.put(_RELOAD),
                name="config-watch",
            )
        except OSError as error:  # e.g. the node's inotify instance limit, shared by all its pods
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
        self._apply(plugins)

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

    def _apply(self, plugins: tuple[PluginConfig, ...]) -> None:
        wanted = {p.resource: p for p in plugins}
        for name, running in list(self._running.items()):
            new = wanted.get(name)
            if new is None or (new.socket, new.plugin_dir) != (running.plugin.socket, running.plugin.plugin_dir):
                self._withdraw(name)  # a moved socket is a new registration
        for name, plugin in wanted.items():
            current = self._running.get(name)
            if current is None:
                self._start(plugin)
            elif current.plugin != plugin:
                logging.info("%s: count %d -> %d", name, current.policy.count, plugin.count)
                current.policy.count = plugin.count
                current.plugin = plugin
                current.runner.devices_changed()

    def _start(self, plugin: PluginConfig) -> None:
        policy = TokenPolicy(plugin.resource, plugin.count)
        runner = PluginRunner(plugin, policy, self._list_and_watch_timeout_s)
        thread = threading.Thread(
            target=self._run_plugin, args=(runner,), name=f"plugin {plugin.resource}", daemon=True
        )
        with self._lock:
            self._running[plugin.resource] = _Running(plugin, policy, runner, thread)
        thread.start()

    def _withdraw(self, name: str) -> None:
        with self._lock:
            running = self._running.pop(name)
            self._failures.pop(name, None)
        running.runner.stop()
        running.thread.join()
        metrics.forget(name)

    def _run_plugin(self, runner: PluginRunner) -> None:
        try:
            runner.run()
        except CannotServeError as error:
            logging.error("%s: cannot serve: %s", runner.config.resource, error)
            with self._lock:
                self._failures[runner.config.resource] = str(error)
            self._events.put(_PLUGIN_FAILED)


def _summary(plugins: tuple[PluginConfig, ...]) -> str:
    return ", ".join(f"{p.resource}={p.count}" for p in plugins)
