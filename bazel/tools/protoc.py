"""protoc from the grpcio-tools wheel, with the well-known types on its include path."""

import importlib.resources
import sys

from grpc_tools import protoc  # type: ignore[import-untyped]


def main() -> int:
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    return protoc.main(["protoc", f"-I{well_known}", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
