"""Everything of ours that is Python type-checks: mypy with mypy.ini over the files it names
(token_resource/, tests/, bench/, bazel/, k8s/, third_party/), against the generated protobuf
stubs and the locked packages' own hints and stub packages. This test's data holds those files.

mypy keeps its incremental cache between runs of this test, in a directory of /tmp named after
the checkout it checks: after a small change it re-checks the changed modules and those whose
view of them changed, in seconds instead of ~15 s. The cache is mypy's own, validated against
every source's hash, the options and mypy's version; a clean checkout (as in CI) starts empty."""

import configparser
import hashlib
import os

from mypy import api

RUNFILES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_dir() -> str:
    # The runfiles' own path changes with each sandbox; the sources they link to do not.
    checkout = os.path.dirname(os.path.realpath(os.path.join(RUNFILES, "mypy.ini")))
    key = hashlib.sha256(checkout.encode()).hexdigest()[:16]
    return os.path.join("/tmp", f"token-resource-mypy-{os.getuid()}", key)


def test_everything_type_checks() -> None:
    # The generated api_pb2.pyi files live in proto/; the third-party packages are on sys.path.
    os.environ["MYPYPATH"] = os.path.join(RUNFILES, "proto")
    os.chdir(RUNFILES)  # mypy.ini's paths are relative to the workspace root
    config = configparser.ConfigParser()
    config.read("mypy.ini")
    files = [f.strip() for f in config["mypy"]["files"].split(",")]
    assert [f for f in files if not os.path.exists(f)] == [], "not in this test's data"
    stdout, stderr, status = api.run(["--config-file", "mypy.ini", "--cache-dir", cache_dir()])
    assert status == 0, stdout + stderr
