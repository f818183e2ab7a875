"""The real daemon (token_resource.main), with plugin_server.SERVER_THREADS set from the command line.

Benchmark-only launcher for threads_vs_asyncio.py: it runs the daemon unchanged, as
`python bench/threads_plugin.py` (the same interpreter start as bench/aio_plugin.py, without the
py_binary launcher), and lets the benchmark try other gRPC worker-pool sizes.

    python bench/threads_plugin.py --plugin_dir=/tmp/x --count=1000 --server_threads=8
"""

from absl import app, flags

from token_resource import main, plugin_server

flags.DEFINE_integer(
    "server_threads", plugin_server.SERVER_THREADS, "gRPC worker threads per resource (plugin_server.SERVER_THREADS)."
)


def _main(argv: list[str]) -> int:
    plugin_server.SERVER_THREADS = flags.FLAGS.server_threads
    return main.main(argv)


if __name__ == "__main__":
    app.run(_main)
