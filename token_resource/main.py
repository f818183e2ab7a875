# Assigned rather than a docstring: absl's --help prints it as the usage text, and the image runs
# with PYTHONOPTIMIZE=2 (-OO), which drops docstrings but keeps assignments.
__doc__ = """token-resource: a Kubernetes device plugin that advertises N tokens of an extended resource.

Usage: token_resource --count=2 --resource=example.com/token
       token_resource --config=/etc/token-resource/config.yaml
The original Go plugin's command line (-loglevel 0 -socket token-resource -count 2
-resource example.com/token) works unchanged.
"""

import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from absl import flags, logging

from token_resource import cli, config, metrics, tokens
from token_resource.kubelet import DEFAULT_REGISTRY_DIR, Registration
from token_resource.lifecycle import handle_signals
from token_resource.plugin_server import CannotServeError
from token_resource.policy import DevicePolicy
from token_resource.supervisor import ConfigFile, Supervisor, Withholder

if TYPE_CHECKING:  # imported where the flags need them: see main() and _withholder()
    from token_resource.status import StatusServer

VERSION = "0.1.0"

FLAGS = flags.FLAGS
flags.DEFINE_integer("count", 1, "Number of tokens advertised on this node.")
flags.DEFINE_string("resource", "example.com/token", "Extended resource name, domain/name.")
flags.DEFINE_string(
    "socket",
    config.DEFAULT_SOCKET,
    "Socket file name in --plugin_dir. When not given, each process serves on its own "
    "token-resource.<instance>.sock, so a newer instance can take over from an older one.",
)
flags.DEFINE_string("plugin_dir", config.DEFAULT_PLUGIN_DIR, "The kubelet's device-plugin directory.")
flags.DEFINE_enum(
    "registration",
    "kubelet",
    [r.value for r in Registration],
    "How the kubelet learns of the plugin: kubelet (Register on kubelet.sock in --plugin_dir) or "
    "plugin_watcher (a socket in --plugins_registry_dir that the kubelet finds). With --config, the "
    "default for resources that do not set registration.",
)
flags.DEFINE_string(
    "plugins_registry_dir",
    DEFAULT_REGISTRY_DIR,
    "The kubelet's plugin-watcher directory, for --registration=plugin_watcher.",
)
flags.DEFINE_string(
    "config",
    None,
    "YAML or JSON file declaring one or more resources with per-node counts; replaces "
    "--count/--resource/--socket and is re-read when it changes or on SIGHUP.",
)
flags.DEFINE_string(
    "node_name", os.environ.get("NODE_NAME"), "This node's name, for per-node counts (default: $NODE_NAME)."
)
flags.DEFINE_integer(
    "http_port",
    None,
    "Serve /healthz, /readyz and /metrics on this port (default: off).",
    lower_bound=0,
    upper_bound=65535,
)
flags.DEFINE_string(
    "http_address", os.environ.get("POD_IP", "127.0.0.1"), "Address for --http_port (default: $POD_IP, else 127.0.0.1)."
)
flags.DEFINE_bool("version", False, "Print the version and exit.")
flags.DEFINE_integer("loglevel", 0, "Go plugin compatibility: the same as -v.")
flags.DEFINE_bool(
    "drain_on_stop",
    True,
    "On SIGTERM, take the resources out of the scheduler's view of this node (its status, through the "
    "Kubernetes API) and let pods already bound to it be admitted before stopping, so none fails "
    "admission; the same before a reload lowers a count or removes a resource. Needs an in-cluster "
    "ServiceAccount token, the node name and the RBAC in k8s/; without them it is skipped.",
)
flags.DEFINE_float(
    "drain_timeout",
    10.0,
    "Longest wait, on SIGTERM or a lower count, for pods already bound to this node.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "list_and_watch_timeout",
    20.0,
    "Seconds to wait for the kubelet to call ListAndWatch after Register before registering again.",
    lower_bound=0.1,
)


def _validator(check: Callable[[Any], None]) -> Callable[[Any], bool]:
    """An absl flag validator from a check that raises ConfigError."""

    def validate(value: Any) -> bool:
        try:
            check(value)
        except config.ConfigError as error:
            raise flags.ValidationError(str(error)) from None
        return True

    return validate


flags.register_validator("count", _validator(config.check_count))
flags.register_validator("resource", _validator(config.check_resource_name))
flags.register_validator("socket", _validator(config.check_socket_name))


def _plugins() -> tuple[tuple[config.PluginConfig, ...], ConfigFile | None, str]:
    """What to serve: from --config, or the single resource the flags describe."""
    # Absolute, because the gRPC target unix://<path> would read a relative path's first
    # component as an authority.
    placement = config.Placement(
        os.path.abspath(FLAGS.plugin_dir),
        os.path.abspath(FLAGS.plugins_registry_dir),
        config.parse_registration(FLAGS.registration),
    )
    if FLAGS.config is None:
        plugin = config.PluginConfig(
            FLAGS.resource,
            FLAGS.count,
            FLAGS.socket,
            placement.plugin_dir,
            per_instance=not FLAGS["socket"].present,
            registration=placement.registration,
            registry_dir=placement.registry_dir,
        )
        config.check_plugin(plugin)
        plugins: tuple[config.PluginConfig, ...] = (plugin,)
        source, text = None, ""
    else:
        given = [f"--{name}" for name in ("count", "resource", "socket") if FLAGS[name].present]
        if given:
            raise config.ConfigError(f"--config declares the resources; drop {', '.join(given)}")
        source = ConfigFile(FLAGS.config, placement, FLAGS.node_name)
        try:
            text, plugins = source.load()
        except config.ConfigError as error:
            raise config.ConfigError(f"{FLAGS.config}: {error}") from None
    for directory in sorted({p.endpoint.socket_dir for p in plugins}):
        _check_directory(directory, "--plugin_dir" if directory == placement.plugin_dir else "--plugins_registry_dir")
    return plugins, source, text


def _check_directory(directory: str, flag: str) -> None:
    """A wrong directory or a missing mount is a deployment mistake: say so at once. (Later, the
    directory going away is waited out: the kubelet re-creates it.)"""
    if not os.path.isdir(directory):
        what = "device-plugin" if flag == "--plugin_dir" else "plugin-watcher"
        raise config.ConfigError(
            f"the {what} directory {directory} does not exist (is the kubelet's directory mounted? see {flag})"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise config.ConfigError(f"cannot create the socket in {directory}: is {directory} writable?")


def token_policy(plugin: config.PluginConfig, previous: DevicePolicy | None) -> DevicePolicy:
    if isinstance(previous, tokens.TokenPolicy):
        return previous.reconfigured(plugin.count)
    return tokens.TokenPolicy(plugin.resource, plugin.count)


def _withholder() -> Withholder | None:
    """The drain on stop, where it can work; says once at start why not otherwise."""
    if not FLAGS.drain_on_stop:
        return None
    api = None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):  # only in a pod is the API client worth loading
        from token_resource import kubeapi

        api = kubeapi.in_cluster()
    if api is None or not FLAGS.node_name:
        missing = "an in-cluster ServiceAccount token" if api is None else "--node_name or $NODE_NAME"
        logging.info("drain on stop: off (it needs %s)", missing)
        return None
    logging.info("drain on stop: on, for node %s", FLAGS.node_name)
    from token_resource import drain

    return drain.NodeDrain(api, FLAGS.node_name, timeout_s=FLAGS.drain_timeout)


def _status_server(supervisor: Supervisor) -> "StatusServer | None":
    """/healthz, /readyz and /metrics with --http_port; without it, http.server is never loaded."""
    if FLAGS.http_port is None:
        return None
    from token_resource.status import StatusServer

    return StatusServer(
        FLAGS.http_address,
        FLAGS.http_port,
        supervisor.statuses,
        lambda: supervisor.reload_error,
        lambda: {p.endpoint.socket_dir for p in supervisor.plugins()},
    )


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.version:
        print(f"token-resource {VERSION}")
        return 0
    if FLAGS.loglevel > logging.get_verbosity():
        logging.set_verbosity(FLAGS.loglevel)
    if FLAGS.http_port is not None:
        metrics.enable()  # before anything is counted; without --http_port, nothing is
    try:
        plugins, source, text = _plugins()
        supervisor = Supervisor(
            plugins,
            token_policy,
            instance=time.time_ns(),
            source=source,
            source_text=text,
            list_and_watch_timeout_s=FLAGS.list_and_watch_timeout,
            withholder=_withholder(),
        )
        status = _status_server(supervisor)
    except (config.ConfigError, OSError) as error:
        return _fail(str(error) if isinstance(error, config.ConfigError) else f"--http_port: {error.strerror}")
    handle_signals({signal.SIGTERM: supervisor.stop, signal.SIGINT: supervisor.stop, signal.SIGHUP: supervisor.reload})
    logging.info("token-resource %s: %s", VERSION, ", ".join(f"{p.count} x {p.resource}" for p in plugins))
    # What start-up loaded lives as long as the process: out of the collector's way for good
    # (__main__.py starts the process with the collector off).
    gc.freeze()
    gc.enable()
    try:
        supervisor.run()
    except CannotServeError as error:
        return _fail(str(error))
    finally:
        if status is not None:
            status.close()
    return 0


def _fail(reason: str) -> int:
    print(f"token-resource: {reason}", file=sys.stderr)
    return 1


def run() -> None:
    cli.run(main, __doc__)


if __name__ == "__main__":  # `-m token_resource.main`, as commands written for earlier images run it
    run()
