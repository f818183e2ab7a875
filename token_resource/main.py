"""token-resource: a Kubernetes device plugin that advertises N tokens of an extended resource.

Usage: token_resource --count=2 --resource=example.com/token
The original Go plugin's command line (-loglevel 0 -socket token-resource -count 2
-resource example.com/token) works unchanged.
"""

import signal
import sys

from absl import app, flags, logging

from token_resource import config, tokens
from token_resource.lifecycle import PluginRunner, StartupError, handle_signals

VERSION = "0.1.0"

FLAGS = flags.FLAGS
flags.DEFINE_integer("count", 1, "Number of tokens advertised on this node.")
flags.DEFINE_string("resource", "example.com/token", "Extended resource name, domain/name.")
flags.DEFINE_string("socket", "token-resource.sock", "Socket file name in --plugin_dir.")
flags.DEFINE_string("plugin_dir", config.DEFAULT_PLUGIN_DIR, "The kubelet's device-plugin directory.")
flags.DEFINE_bool("version", False, "Print the version and exit.")
flags.DEFINE_integer("loglevel", 0, "Go plugin compatibility: the same as -v.")
flags.DEFINE_float(
    "list_and_watch_timeout",
    20.0,
    "Seconds to wait for the kubelet to call ListAndWatch after Register before registering again.",
    lower_bound=0.1,
)


def _validator(check):
    def validate(value) -> bool:
        try:
            check(value)
        except config.ConfigError as error:
            raise flags.ValidationError(str(error)) from None
        return True

    return validate


def _check_count(count: int) -> None:
    if count < 1:
        raise config.ConfigError(f"count must be a positive integer, not {count}")
    limit = tokens.max_count()
    if count > limit:
        raise config.ConfigError(
            f"count {count} is too large: one ListAndWatch snapshot must stay under the kubelet's "
            f"4 MiB message limit, which fits at most {limit} tokens"
        )


flags.register_validator("count", _validator(_check_count))
flags.register_validator("resource", _validator(config.check_resource_name))
flags.register_validator("socket", _validator(config.check_socket_name))


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.version:
        print(f"token-resource {VERSION}")
        return 0
    if FLAGS.loglevel > logging.get_verbosity():
        logging.set_verbosity(FLAGS.loglevel)
    plugin = config.PluginConfig(
        resource=FLAGS.resource, count=FLAGS.count, socket=FLAGS.socket, plugin_dir=FLAGS.plugin_dir
    )
    runner = PluginRunner(plugin, tokens.TokenPolicy(plugin.resource, plugin.count), FLAGS.list_and_watch_timeout)
    handle_signals({signal.SIGTERM: runner.stop, signal.SIGINT: runner.stop})
    logging.info("token-resource %s: %d tokens of %s", VERSION, plugin.count, plugin.resource)
    try:
        runner.run()
    except StartupError as error:
        logging.error("%s", error)
        print(f"token-resource: {error}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
