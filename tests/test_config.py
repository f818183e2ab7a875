import pytest

from token_resource import config

# The kubelet's own test vectors (IsExtendedResourceName), plus edge cases of length.
ACCEPTED = [
    "example.com/token",
    "nvidia.com/gpu",
    "example.com/GPU_mem.v2",
    "k8s.io/gpu",
    "a.b-c.example/x",
    "example.com/" + "a" * 63,
    "d" * 63 + "." + "d" * 63 + "." + "d" * 63 + "." + "d" * 52 + "/x",  # 244-char domain
]
REJECTED = [
    "gpu",
    "kubernetes.io/gpu",
    "foo.kubernetes.io/gpu",
    "requests.example.com/gpu",
    "Example.com/gpu",
    "example.com/a/b",
    "example.com/",
    "example.com/-gpu",
    "ex_ample.com/gpu",
    "example.com/" + "a" * 64,
    "d" * 63 + "." + "d" * 63 + "." + "d" * 63 + "." + "d" * 53 + "/x",  # 245-char domain
    "/token",
    "-example.com/token",
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepts_names_the_kubelet_accepts(name):
    config.check_resource_name(name)


@pytest.mark.parametrize("name", REJECTED)
def test_rejects_names_the_kubelet_rejects(name):
    with pytest.raises(config.ConfigError, match="resource name"):
        config.check_resource_name(name)


@pytest.mark.parametrize("socket", ["token-resource.sock", "token-resource", "a"])
def test_accepts_bare_socket_names(socket):
    config.check_socket_name(socket)


@pytest.mark.parametrize("socket", ["", "/var/lib/kubelet/device-plugins/x.sock", "dir/x.sock", ".", "..", "kubelet.sock"])
def test_rejects_socket_names_that_are_not_bare_file_names(socket):
    with pytest.raises(config.ConfigError, match="socket"):
        config.check_socket_name(socket)


def test_socket_paths_are_joined_onto_the_plugin_directory():
    plugin = config.PluginConfig(resource="example.com/token", count=2, socket="t.sock", plugin_dir="/d")
    assert plugin.socket_path == "/d/t.sock"
    assert plugin.kubelet_socket_path == "/d/kubelet.sock"
