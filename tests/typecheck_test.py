"""Everything of ours that is Python type-checks: mypy with mypy.ini over the files it names
(token_resource/, tests/, bench/, bazel/, k8s/, third_party/), against the generated protobuf
stubs and the locked packages' own hints and stub packages. This test's data holds those files."""

import configparser
import os

from mypy import api

RUNFILES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_everything_type_checks() -> None:
    # The generated api_pb2.pyi files live in proto/; the third-party packages are on sys.path.
    os.environ["MYPYPATH"] = os.path.join(RUNFILES, "proto")
    os.chdir(RUNFILES)  # mypy.ini's paths are relative to the workspace root
    config = configparser.ConfigParser()
    config.read("mypy.ini")
    files = [f.strip() for f in config["mypy"]["files"].split(",")]
    assert [f for f in files if not os.path.exists(f)] == [], "not in this test's data"
    stdout, stderr, status = api.run(["--config-file", "mypy.ini", "--no-incremental", "--cache-dir", os.devnull])
    assert status == 0, stdout + stderr
