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
def test_accepts_names_the_kubelet_accepts(name: str) -> None:
    config.check_resource_name(name)


@pytest.mark.parametrize("name", REJECTED)
def test_rejects_names_the_kubelet_rejects(name: str) -> None:
    with pytest.raises(config.ConfigError, match="resource name"):
        config.check_resource_name(name)


@pytest.mark.parametrize("socket", ["token-resource.sock", "token-resource", "a"])
def test_accepts_bare_socket_names(socket: str) -> None:
    config.check_socket_name(socket)


@pytest.mark.parametrize(
    "socket", ["", "/var/lib/kubelet/device-plugins/x.sock", "dir/x.sock", ".", "..", "kubelet.sock"]
)
def test_rejects_socket_names_that_are_not_bare_file_names(socket: str) -> None:
    with pytest.raises(config.ConfigError, match="socket"):
        config.check_socket_name(socket)


def test_a_named_socket_is_used_as_it_is() -> None:
    plugin = config.PluginConfig(resource="example.com/token", count=2, socket="t.sock", plugin_dir="/d")
    endpoint = plugin.endpoint
    assert (endpoint.resource, endpoint.plugin_dir, endpoint.per_instance) == ("example.com/token", "/d", False)
    assert endpoint.socket_name(1796009551786717806) == "t.sock"
    assert endpoint.kubelet_socket_path == "/d/kubelet.sock"


def test_a_per_instance_socket_carries_the_instance_number() -> None:
    plugin = config.PluginConfig("example.com/token", 2, config.DEFAULT_SOCKET, "/d", per_instance=True)
    assert plugin.endpoint.socket_name(1796009551786717806) == "token-resource.1796009551786717806.sock"


@pytest.mark.parametrize("per_instance", [False, True])
def test_the_socket_path_limit_counts_the_staging_name_and_the_longest_instance(per_instance: bool) -> None:
    # The server binds .<socket>.new before renaming it into place; an instance has up to 19 digits.
    longest = "/.x.9999999999999999999.sock.new" if per_instance else "/.x.sock.new"
    fits = "/" + "d" * (config.MAX_SOCKET_PATH_BYTES - len(longest) - 1)
    config.check_plugin(config.PluginConfig("example.com/token", 1, "x.sock", fits, per_instance))
    with pytest.raises(config.ConfigError, match="longer than 107 bytes; choose a shorter socket name"):
        config.check_plugin(config.PluginConfig("example.com/token", 1, "x.sock", fits + "d", per_instance))


def parse(text: str, node: str | None = None) -> tuple[config.PluginConfig, ...]:
    return config.parse_config(text, config.Placement(plugin_dir="/d"), node)


def test_a_config_file_declares_several_resources_with_per_node_counts() -> None:
    text = """
resources:
  - name: example.com/token
    count: 2
    nodes: {worker-1: 5, worker-2: 0}
  - name: example.com/license
    count: 1
    socket: licenses.sock
"""
    assert parse(text, "worker-1") == (
        # no socket given: each process serves on its own token-resource-example.com_token.<instance>.sock
        config.PluginConfig("example.com/token", 5, "token-resource-example.com_token.sock", "/d", per_instance=True),
        config.PluginConfig("example.com/license", 1, "licenses.sock", "/d", per_instance=False),
    )
    assert parse(text, "worker-2")[0].count == 0
    assert parse(text, "worker-9")[0].count == 2
    assert parse(text, None)[0].count == 2


def test_json_is_accepted_too() -> None:
    assert parse('{"resources": [{"name": "example.com/token", "count": 3}]}')[0].count == 3


@pytest.mark.parametrize(
    "text,message",
    [
        ("resources: [", "not valid YAML or JSON (line 1)"),
        ("[]", 'expected a mapping with a list under "resources"'),
        ("resources: []", "resources is empty"),
        ("resources: [{name: example.com/t}]\nextra: 1", "unknown top-level key(s) ['extra']"),
        ("resources: [{count: 2}]", "resources[0]: name is required"),
        ("resources: [{name: gpu}]", "resources[0] (gpu): resource name"),
        ("resources: [{name: example.com/t, cout: 2}]", "unknown key(s) ['cout']"),
        ("resources: [{name: example.com/t, count: two}]", "count must be an integer, not 'two'"),
        (
            "resources: [{name: example.com/t, count: -1}]",
            "resources[0] (example.com/t): count must be zero or more, not -1",
        ),
        ("resources: [{name: example.com/t, count: 999999}]", "count 999999 is too large"),
        ("resources: [{name: example.com/t, count: true}]", "must be an integer"),
        ("resources: [{name: example.com/t, nodes: {a: x}}]", "nodes.a must be an integer"),
        ("resources: [{name: example.com/t, nodes: [a]}]", "nodes must map node names to counts"),
        ("resources: [{name: example.com/t, socket: a/b}]", "bare file name"),
        (
            "resources: [{name: example.com/t}, {name: example.com/t, socket: x}]",
            "resource example.com/t is declared more than once",
        ),
        (
            "resources: [{name: example.com/a, socket: s}, {name: example.com/b, socket: s}]",
            "socket s is declared more than once",
        ),
        ("resources: [{name: example.com/t, socket: " + "s" * 110 + "}]", "longer than 107 bytes"),
        ("resources: [{name: example.com/t, nodes: {010: 1}}]", "node name 8 is not a string; quote it"),
        ("resources: [{name: example.com/t, nodes: {yes: 1}}]", "node name True is not a string"),
        ("resources: [{name: example.com/t, 1: x, b: y}]", "unknown key(s) ['1', 'b']"),
        (
            "resources: [{name: example.com/token}, {name: example-com/token}]",
            "example.com/token and example-com/token would both set $EXAMPLE_COM_TOKEN",
        ),
    ],
)
def test_a_bad_config_file_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        parse(text)
    assert message in str(raised.value)
