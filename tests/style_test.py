"""The tree stays clean: ruff (lint and format) on every Python file, buildifier on every
Bazel file. Runs on the source tree itself (found through this file's runfiles link), so it
sees files no target lists; tagged external so Bazel never serves it from the cache."""

import fnmatch
import glob
import os
import platform
import subprocess

import pytest

WORKSPACE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
RUNFILES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The buildifier release binary for this machine (both are in the test's data).
BUILDIFIER = {"x86_64": "linux_amd64", "aarch64": "linux_arm64", "arm64": "linux_arm64"}[platform.machine()]


def tool(pattern: str) -> str:
    matches = glob.glob(os.path.join(RUNFILES, "..", pattern))
    assert len(matches) == 1, f"{pattern}: {matches}"
    return matches[0]


def source_files(*patterns: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(WORKSPACE):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "bazel-")))
        found += [os.path.join(root, f) for f in sorted(files) if any(fnmatch.fnmatch(f, p) for p in patterns)]
    return found


def run(*command: str) -> None:
    result = subprocess.run(command, cwd=WORKSPACE, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command[:3])} ...:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("mode", [("check",), ("format", "--check", "--diff")])
def test_python_is_ruff_clean(mode: tuple[str, ...]) -> None:
    run(tool("pypi/ruff/site/ruff-*.data/scripts/ruff"), *mode, "--no-cache", "--config", "ruff.toml", ".")


def test_bazel_files_are_buildifier_clean() -> None:
    files = source_files("BUILD.bazel", "*.bzl", "WORKSPACE")
    # Bazel 4 predates rules_python and rules_shell: the native rules are the ones to use.
    run(
        tool(f"buildifier/buildifier-{BUILDIFIER}"),
        "-mode=check",
        "-lint=warn",
        "-warnings=-native-py,-native-sh-binary",
        *files,
    )
