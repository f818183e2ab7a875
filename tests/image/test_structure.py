"""Structure tests of the built image index (//:image_index), without running a container."""

import importlib.util
import json
import re
import stat

import pytest

from tests.image import imagefs

ARCHES = ["amd64", "arm64"]
with open(imagefs.runfile("third_party/debian/packages.lock.json")) as lock_file:
    LOCK = json.load(lock_file)

# Extension modules whose shared libraries come from packages the lock excludes on purpose
# (third_party/debian/packages.ini [excluded]): importing them fails, the daemon never does.
UNSATISFIED_OK = {
    "_dbm": "libdb5.3",
    "_gdbm": "libgdbm",
    "_sqlite3": "libsqlite3-0",
    "readline": "libreadline8",
    "_curses": "libncursesw6",
    "_curses_panel": "libncursesw6",
    "nis": "libnsl2",
    "_crypt": "libcrypt1",
    "_uuid": "libuuid1",
}


def version() -> str:
    with open(imagefs.runfile("token_resource/main.py")) as f:
        found = re.search(r'^VERSION = "(.*)"$', f.read(), re.M)
    assert found, "no VERSION in main.py"
    return found.group(1)


@pytest.fixture(scope="module", params=ARCHES)
def image(request: pytest.FixtureRequest) -> imagefs.ImageFS:
    fs = imagefs.image_for(request.param)
    fs.arch = request.param
    return fs


def test_index_has_both_platforms() -> None:
    layout = imagefs.index_layout()
    top = layout.top()
    assert top["mediaType"] == "application/vnd.oci.image.index.v1+json"
    index = layout.read_json(top["digest"])
    platforms = sorted(
        (m["platform"]["os"], m["platform"]["architecture"], m["platform"].get("variant")) for m in index["manifests"]
    )
    assert platforms == [("linux", "amd64", None), ("linux", "arm64", "v8")]
    for descriptor in index["manifests"]:
        assert descriptor["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        config = layout.read_json(layout.read_json(descriptor["digest"])["config"]["digest"])
        assert (config["os"], config["architecture"]) == (
            descriptor["platform"]["os"],
            descriptor["platform"]["architecture"],
        )
    with open(imagefs.runfile("image_index.digest")) as f:
        assert f.read().strip() == top["digest"]


def test_config(image: imagefs.ImageFS) -> None:
    config = image.config["config"]
    assert config["Entrypoint"] == ["/usr/bin/python3.11", "-m", "token_resource"]
    assert "Cmd" not in config
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYTHONPATH"] == "/app:/app/site-packages"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONOPTIMIZE"] == "2"  # runs the .opt-2.pyc files
    assert config["User"] == "0:0"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == version()
    assert labels["io.example.token-resource.deviceplugin-api"] == "v1beta1"
    revision = labels["org.opencontainers.image.revision"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", revision), revision
    assert image.config["created"] == "1970-01-01T00:00:00Z"
    assert image.config["rootfs"]["diff_ids"] and len(image.config["rootfs"]["diff_ids"]) == len(
        image.manifest["layers"]
    )


def test_expected_files(image: imagefs.ImageFS) -> None:
    triplet = imagefs.TRIPLETS[image.arch]
    for path in [
        "usr/bin/python3.11",
        "usr/lib/python3.11/os.py",
        "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
        "usr/lib/python3.11/concurrent/futures/thread.py",
        f"usr/lib/python3.11/lib-dynload/_ctypes.cpython-311-{triplet}.so",
        "app/token_resource/main.py",
        "app/token_resource/__pycache__/main.cpython-311.pyc",
        "app/deviceplugin/v1beta1/api_pb2.py",
        "app/deviceplugin/v1beta1/api_pb2_grpc.py",
        f"app/site-packages/grpc/_cython/cygrpc.cpython-311-{triplet}.so",
        "app/site-packages/google/protobuf/__init__.py",
        "app/site-packages/absl/app.py",
        "app/site-packages/inotify_simple.py",
        "app/site-packages/typing_extensions.py",
        "etc/passwd",
    ]:
        assert image.file(path) is not None, path
    assert image.regular("etc/passwd")[1].startswith(b"root:x:0:0:")
    # The daemon writes its /metrics itself: prometheus_client is a test-only dependency.
    assert not any(p.startswith("app/site-packages/prometheus_client") for p in image.entries)
    info, _ = image.regular("usr/bin/python3.11")
    assert info.mode & stat.S_IXUSR


def test_layers_least_changed_first(image: imagefs.ImageFS) -> None:
    layer_of = lambda path: image.entries[path][2]  # noqa: E731
    assert layer_of("usr/bin/python3.11") == 0
    assert (
        layer_of("usr/bin/python3.11")
        < layer_of("app/site-packages/grpc/__init__.py")
        < layer_of("app/token_resource/main.py")
    )
    assert layer_of("app/token_resource/main.py") == len(image.manifest["layers"]) - 1


def test_dpkg_status_lists_exactly_the_locked_packages(image: imagefs.ImageFS) -> None:
    names = {p.rsplit("/", 1)[1] for p in image.entries if p.startswith("var/lib/dpkg/status.d/")}
    assert names == {p["name"] for p in LOCK["packages"][image.arch]}
    for package in LOCK["packages"][image.arch]:
        control = image.regular("var/lib/dpkg/status.d/" + package["name"])[1].decode()
        assert f"Version: {package['version']}\n" in control


def test_no_shell_no_package_managers(image: imagefs.ImageFS) -> None:
    for path in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "bin/dash",
        "usr/bin/env",
        "usr/bin/apt",
        "usr/bin/apt-get",
        "usr/bin/dpkg",
    ]:
        assert not image.exists(path), path
    for path in image.entries:
        parts = path.split("/")
        assert not any(p == "pip" or p.startswith("pip-") or p.startswith("pip3") or p == "ensurepip" for p in parts), (
            path
        )
        assert not path.endswith(".whl"), path
    binaries = sorted(p.rsplit("/", 1)[1] for p in image.entries if p.startswith("usr/bin/"))
    assert binaries == ["python3.11"]


def test_ownership_modes_and_times(image: imagefs.ImageFS) -> None:
    for path, (info, _, _) in image.entries.items():
        assert (info.uid, info.gid, info.mtime) == (0, 0, 0), path
        if not info.issym():
            assert not info.mode & stat.S_IWOTH, f"/{path} is world-writable"
        assert not info.mode & (stat.S_ISUID | stat.S_ISGID), f"/{path} is setuid/setgid"


def test_bytecode_is_hash_based_and_current(image: imagefs.ImageFS) -> None:
    """Every module under /app has unchecked hash-based .pyc files for this Python (PEP 552),
    plain and -OO's (.opt-2.pyc, which the image's PYTHONOPTIMIZE=2 runs)."""
    sources = [p for p in image.entries if p.startswith("app/") and p.endswith(".py")]
    assert len(sources) > 100
    for path in sources:
        directory, name = path.rsplit("/", 1)
        for suffix in ("", ".opt-2"):
            pyc = image.file(f"{directory}/__pycache__/{name[:-3]}.cpython-311{suffix}.pyc")
            assert pyc is not None, f"no {suffix or '.pyc'} for /{path}"
            header = pyc[1][:16]
            assert header[:4] == importlib.util.MAGIC_NUMBER
            assert int.from_bytes(header[4:8], "little") == 0b01  # hash-based, unchecked
            assert header[8:16] == importlib.util.source_hash(image.regular(path)[1])
    assert image.file("usr/lib/python3.11/__pycache__/os.cpython-311.opt-2.pyc") is not None


def test_elf_files_match_arch_and_their_libraries_are_present(image: imagefs.ImageFS) -> None:
    triplet = imagefs.TRIPLETS[image.arch]
    search = [f"usr/lib/{triplet}", f"lib/{triplet}", "usr/lib", "lib"]
    seen = 0
    for path, (info, data, _) in sorted(image.entries.items()):
        if not info.isfile() or not imagefs.is_elf(data):
            continue
        seen += 1
        elf = imagefs.elf_info(data)
        assert elf["machine"] == imagefs.ELF_MACHINES[image.arch], f"/{path} is for machine {elf['machine']}"
        if elf["interp"]:
            assert image.file(elf["interp"]) is not None, f"/{path}: no loader {elf['interp']}"
        missing = [lib for lib in elf["needed"] if not any(image.file(f"{d}/{lib}") for d in search)]
        module = path.rsplit("/", 1)[1].split(".", 1)[0]
        if missing:
            assert module in UNSATISFIED_OK and "lib-dynload" in path, f"/{path} needs {missing}, not in the image"
    assert seen > 30
    python = imagefs.elf_info(image.regular("usr/bin/python3.11")[1])
    assert python["interp"] in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1")
