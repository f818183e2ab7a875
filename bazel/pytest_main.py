"""Runs pytest on the files given as arguments; the main of every py_pytest_test."""

import os
import sys

import pytest

if __name__ == "__main__":
    args = ["-p", "no:cacheprovider", "-q", *sys.argv[1:]]
    if "TEST_TIMEOUT" in os.environ:  # a hang shows every thread's stack before Bazel kills it
        args += ["-o", f"faulthandler_timeout={max(5, int(os.environ['TEST_TIMEOUT']) - 10)}"]
    if "XML_OUTPUT_FILE" in os.environ:
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    sys.exit(pytest.main(args))
