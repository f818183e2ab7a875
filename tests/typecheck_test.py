"""The daemon type-checks: mypy with mypy.ini over token_resource/, against the generated
protobuf stubs and the locked packages' own hints and stub packages."""

import os

from mypy import api

RUNFILES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_token_resource_type_checks():
    # The generated api_pb2.pyi files live in proto/; everything else is on sys.path already.
    os.environ["MYPYPATH"] = os.path.join(RUNFILES, "proto")
    config = os.path.join(RUNFILES, "mypy.ini")
    stdout, stderr, status = api.run(
        ["--config-file", config, "--no-incremental", "--cache-dir", os.devnull, "-p", "token_resource"]
    )
    assert status == 0, stdout + stderr
