"""`kubectl kustomize k8s/` renders what the plain manifest holds, hardened as the README says,
`kubectl kustomize k8s/surge` the same with surge updates, and `kubectl kustomize
k8s/plugin-watcher` the same registering through the kubelet's plugin watcher.

kubectl must be on PATH (tools/bazel installs Debian's kubernetes-client where none is). Its
built-in kustomize renders the directory, so the kustomization is checked with the tool users run.
"""

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from k8s import manifests
from token_resource import config

KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    assert KUBECTL, "kubectl is not on PATH: run tools/bazel once (it installs Debian's kubernetes-client)"
    # A plain copy: kustomize refuses files that are symlinks out of the directory (Bazel's runfiles).
    directory = tmp_path_factory.mktemp("k8s")
    for name in (*manifests.KUSTOMIZATIONS, *manifests.MANIFESTS, manifests.SURGE_PATCH, manifests.WATCHER_PATCH):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifests.K8S_DIR / name, directory / name)
    return directory


def _kustomize(directory: pathlib.Path) -> dict[str, dict]:
    assert KUBECTL, "kubectl is not on PATH"
    output = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert output.returncode == 0, output.stderr
    documents = [doc for doc in yaml.safe_load_all(output.stdout) if doc]
    return {doc["kind"]: doc for doc in documents} | {"_all": documents}


@pytest.fixture(scope="module")
def rendered(k8s_copy: pathlib.Path) -> dict[str, dict]:
    return _kustomize(k8s_copy)


@pytest.fixture(scope="module")
def rendered_surge(k8s_copy: pathlib.Path) -> dict[str, dict]:
    return _kustomize(k8s_copy / "surge")


@pytest.fixture(scope="module")
def rendered_watcher(k8s_copy: pathlib.Path) -> dict[str, dict]:
    return _kustomize(k8s_copy / "plugin-watcher")


@pytest.fixture(scope="module")
def pod(rendered: dict[str, dict]) -> dict:
    return rendered["DaemonSet"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: dict) -> dict:
    [container] = pod["containers"]
    return container


def test_kustomize_installs_exactly_the_plain_manifest(rendered: dict[str, dict]) -> None:
    plain = manifests.load_documents(manifests.K8S_DIR / manifests.MANIFESTS[0])
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(rendered["_all"], key=key) == sorted(plain, key=key)
    # Namespace, then ServiceAccount, its RBAC and the ConfigMap, before the DaemonSet that uses them.
    assert [doc["kind"] for doc in rendered["_all"]] == [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ]
    for doc in rendered["_all"]:
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "token-resource"
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "token-resource"


def test_surge_variant_differs_only_in_the_update_strategy(
    rendered: dict[str, dict], rendered_surge: dict[str, dict]
) -> None:
    assert [doc["kind"] for doc in rendered_surge["_all"]] == [doc["kind"] for doc in rendered["_all"]]
    for plain, surge in zip(rendered["_all"], rendered_surge["_all"], strict=True):
        if plain["kind"] != "DaemonSet":
            assert surge == plain
    daemonset = rendered_surge["DaemonSet"]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    plain_spec = dict(rendered["DaemonSet"]["spec"], updateStrategy=None)
    assert dict(daemonset["spec"], updateStrategy=None) == plain_spec
    # What //k8s:schemas_test validates is what kustomize renders.
    assert daemonset == manifests.surge_daemonset()


def test_plugin_watcher_variant_adds_the_flag_and_the_registry_only(
    rendered: dict[str, dict], rendered_watcher: dict[str, dict]
) -> None:
    for plain, watcher in zip(rendered["_all"], rendered_watcher["_all"], strict=True):
        if plain["kind"] != "DaemonSet":
            assert watcher == plain
    [plain_container] = rendered["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    pod = rendered_watcher["DaemonSet"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == [*plain_container["args"], "--registration=plugin_watcher"]
    # Mounted at the host's path: the kubelet dials the socket by the path it found it at.
    mount = {"name": "plugins-registry", "mountPath": "/var/lib/kubelet/plugins_registry"}
    assert mount in container["volumeMounts"]
    assert {
        "name": "plugins-registry",
        "hostPath": {"path": "/var/lib/kubelet/plugins_registry", "type": "Directory"},
    } in pod["volumes"]
    for version in (manifests.OLDEST, manifests.NEWEST):  # every version has the plugin watcher
        manifests.validate(rendered_watcher["DaemonSet"], version)


def test_namespace_is_labelled_privileged_for_the_hostpath(rendered: dict[str, dict]) -> None:
    labels = rendered["Namespace"]["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "privileged"


def test_container_security_context(container: dict, pod: dict) -> None:
    context = container["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in context["capabilities"]
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        assert pod.get(host_namespace, False) is False


def test_only_the_device_plugin_directory_comes_from_the_host(pod: dict, container: dict) -> None:
    host_paths = [volume for volume in pod["volumes"] if "hostPath" in volume]
    assert host_paths == [
        {"name": "device-plugins", "hostPath": {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}
    ]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["device-plugins"]["mountPath"] == config.DEFAULT_PLUGIN_DIR
    # Every other volume is a ConfigMap, read-only and not via subPath (which never updates).
    for volume in pod["volumes"]:
        if volume["name"] != "device-plugins":
            assert set(volume) == {"name", "configMap"}
            assert mounts[volume["name"]]["readOnly"] is True
            assert "subPath" not in mounts[volume["name"]]


def test_api_token_only_in_the_plugin_pod_with_the_drains_rules(
    rendered: dict[str, dict], pod: dict, container: dict
) -> None:
    # The plugin pod mounts a token (the drain patches its node's status on SIGTERM); other pods
    # of the ServiceAccount (the test Deployment) do not, since the ServiceAccount says no.
    assert pod["automountServiceAccountToken"] is True
    assert rendered["ServiceAccount"]["automountServiceAccountToken"] is False
    account = rendered["ServiceAccount"]["metadata"]
    assert pod["serviceAccountName"] == account["name"]
    # Exactly these rules, nothing namespaced elsewhere, no wildcards.
    rules = {
        (tuple(rule["apiGroups"]), resource, verb)
        for rule in rendered["ClusterRole"]["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # Exactly what drain.py uses (checked on realk8s with a ServiceAccount holding only these).
    assert rules == {
        (("",), "nodes", "watch"),
        (("",), "nodes/status", "patch"),
        (("",), "pods", "list"),
    }
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in rendered["ClusterRole"]["rules"])
    binding = rendered["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": rendered["ClusterRole"]["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    # The drain patches the node it runs on: its name from the downward API.
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["NODE_NAME"] == "spec.nodeName"


def test_grace_period_leaves_room_for_the_drain(pod: dict) -> None:
    # The drain takes up to about 10 s; the kubelet sends SIGKILL after the grace period.
    assert pod["terminationGracePeriodSeconds"] >= 20


def test_scheduling_every_linux_node_first(pod: dict) -> None:
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    tolerated = {(t.get("key"), t["operator"], t.get("effect")) for t in pod["tolerations"]}
    assert {(None, "Exists", "NoSchedule"), (None, "Exists", "NoExecute")} <= tolerated


def test_rolling_update_never_surges(rendered: dict[str, dict]) -> None:
    strategy = rendered["DaemonSet"]["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1
    # Absent means the default, 0; a 1.20 API server refuses the field altogether.
    assert strategy["rollingUpdate"].get("maxSurge", 0) == 0


def _mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, quantity
    number, unit = match.groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def test_resources_leave_room_above_the_measured_rss(container: dict) -> None:
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    # The daemon idles at 45 MiB VmRSS, 25 MiB cgroup usage (comment in base/token-resource.yaml);
    # Go-sized limits OOM it.
    assert _mebibytes(resources["requests"]["memory"]) >= 48
    assert _mebibytes(resources["limits"]["memory"]) >= 2 * _mebibytes(resources["requests"]["memory"])


def test_image_is_the_one_bazel_loads(container: dict) -> None:
    assert container["image"] == "token-resource:latest"
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_probes_use_the_daemons_http_endpoint(container: dict) -> None:
    args = container["args"]
    [port] = [int(arg.split("=", 1)[1]) for arg in args if arg.startswith("--http_port=")]
    [named] = container["ports"]
    assert (named["name"], named["containerPort"]) == ("http", port)
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": ("/healthz", "http"),
        "livenessProbe": ("/healthz", "http"),
        "readinessProbe": ("/readyz", "http"),
    }
    # No host: the kubelet probes the pod IP, where the daemon listens ($POD_IP).
    assert all("host" not in container[probe]["httpGet"] for probe in paths)
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}


def _config(rendered: dict[str, dict]) -> tuple[str, str]:
    [arg] = [a for a in rendered["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["args"] if "--config" in a]
    path = pathlib.PurePosixPath(arg.split("=", 1)[1])
    pod = rendered["DaemonSet"]["spec"]["template"]["spec"]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = rendered["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    return configmap["data"][path.name], str(path)


def test_configmap_holds_a_config_the_daemon_accepts(rendered: dict[str, dict]) -> None:
    text, _ = _config(rendered)
    [plugin] = config.parse_config(text, config.Placement(), "any-node")
    assert (plugin.resource, plugin.count) == ("example.com/token", 2)
    # No socket name: each instance serves on a socket of its own, so that two (a surge update)
    # can run side by side on a node.
    assert all("socket" not in entry for entry in yaml.safe_load(text)["resources"])
    assert plugin.socket == config.default_socket(plugin.resource)


def test_the_commented_examples_work_when_uncommented(rendered: dict[str, dict]) -> None:
    text, _ = _config(rendered)
    # Comment lines that are YAML (`key: value`, `- key: value`, `key:`), not prose.
    example = re.sub(r"(?m)^(\s*)# ( *(?:- )?[\w./-]+:(?: \S+)?)$", r"\1\2", text)
    assert example != text
    counts = {
        node: {p.resource: p.count for p in config.parse_config(example, config.Placement(), node)}
        for node in ("worker-small", "worker-big", "another-node")
    }
    assert counts == {
        "worker-small": {"example.com/token": 1, "example.com/licence": 4},
        "worker-big": {"example.com/token": 8, "example.com/licence": 4},
        "another-node": {"example.com/token": 2, "example.com/licence": 4},
    }


def test_the_test_deployment_asks_for_one_token_of_the_configured_resource(rendered: dict[str, dict]) -> None:
    [deployment] = manifests.load_documents(manifests.K8S_DIR / "token-resource-test.yaml")
    text, _ = _config(rendered)
    [plugin] = config.parse_config(text, config.Placement(), None)
    assert deployment["spec"]["replicas"] == 10
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"][plugin.resource] == 1
    assert container["imagePullPolicy"] == "IfNotPresent"
