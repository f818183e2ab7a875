"""Runs pytest on the files given as arguments; the main of every py_pytest_test."""

import os
import sys

import pytest


class _Shard:
    """Bazel test sharding (a target's shard_count): shard TEST_SHARD_INDEX of TEST_TOTAL_SHARDS
    runs every TEST_TOTAL_SHARDS-th collected test, so the shards split a suite evenly."""

    def __init__(self, index: int, total: int) -> None:
        self.index, self.total = index, total

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep = items[self.index :: self.total]
        kept = {id(item) for item in keep}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep


if __name__ == "__main__":
    args = ["-p", "no:cacheprovider", "-q", *sys.argv[1:]]
    if "TEST_TIMEOUT" in os.environ:  # a hang shows every thread's stack before Bazel kills it
        args += ["-o", f"faulthandler_timeout={max(5, int(os.environ['TEST_TIMEOUT']) - 10)}"]
    if "XML_OUTPUT_FILE" in os.environ:
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    plugins: list[object] = []
    if "TEST_TOTAL_SHARDS" in os.environ:
        if "TEST_SHARD_STATUS_FILE" in os.environ:  # tells Bazel this runner shards
            open(os.environ["TEST_SHARD_STATUS_FILE"], "w").close()
        plugins.append(_Shard(int(os.environ["TEST_SHARD_INDEX"]), int(os.environ["TEST_TOTAL_SHARDS"])))
    code = pytest.main(args, plugins=plugins)
    # A shard may get no tests (more shards than tests): that is not a failure.
    sys.exit(0 if plugins and code == pytest.ExitCode.NO_TESTS_COLLECTED else code)
