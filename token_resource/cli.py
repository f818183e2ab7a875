"""The command line around the daemon's main(): absl's flags and log format, without absl.app.

absl.app imports pdb for its debugger flags, and with it inspect, bdb, code and more: ~16 ms of
the daemon's ~230 ms start in the image (BENCHMARKS.md, "Start-up"), for flags a daemon never
uses. This module does the part of app.run() the daemon needs: --help (also --helpshort, -?) and
--helpfull, a flag error as one line and exit status 1, absl's log handler, main's exit status.
"""

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_bool("help", False, "Show the usage and this program's own flags, then exit.", short_name="?")
flags.DEFINE_bool("helpshort", False, "The same as --help.")
flags.DEFINE_bool("helpfull", False, "Show the usage and every flag, absl's logging flags too, then exit.")


class UsageError(Exception):
    """A command line that parses but makes no sense: main() raises it, run() prints the usage."""


def run(main: Callable[[list[str]], int], usage: str) -> NoReturn:
    """Parses sys.argv into FLAGS, then exits with main(the arguments left)."""
    try:
        arguments = FLAGS(sys.argv)
    except flags.Error as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)
    if FLAGS.help or FLAGS.helpshort or FLAGS.helpfull:
        sys.stdout.write(help_text(usage, everything=FLAGS.helpfull))
        sys.exit(0)
    logging.use_absl_handler()
    try:
        sys.exit(main(arguments))
    except UsageError as error:
        sys.stderr.write(f"{help_text(usage, everything=False)}\n{error}\n")
        sys.exit(1)


def help_text(usage: str, everything: bool) -> str:
    flag_help = FLAGS.get_help() if everything else FLAGS.main_module_help()
    return f"{usage}\nflags:\n{flag_help}\n" if flag_help else usage
