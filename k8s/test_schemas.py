"""Every manifest in k8s/ is valid for the oldest and the newest Kubernetes the README claims,
and the schemas used are strict and really of those versions."""

import copy
from typing import Any

import jsonschema
import pytest

from k8s import manifests

VERSIONS = (manifests.OLDEST, manifests.NEWEST)
DOCUMENTS = [(name, doc) for name in manifests.MANIFESTS for doc in manifests.load_documents(manifests.K8S_DIR / name)]


def _daemonset() -> dict:
    [daemonset] = [doc for _, doc in DOCUMENTS if doc["kind"] == "DaemonSet"]
    return copy.deepcopy(daemonset)


def test_every_manifest_file_is_covered() -> None:
    yaml_files = {str(path.relative_to(manifests.K8S_DIR)) for path in manifests.K8S_DIR.glob("**/*.yaml")}
    assert yaml_files == {
        *manifests.MANIFESTS,
        *manifests.KUSTOMIZATIONS,
        manifests.SURGE_PATCH,
        manifests.WATCHER_PATCH,
    }
    assert {doc["kind"] for _, doc in DOCUMENTS} == {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "document"), DOCUMENTS, ids=[f"{n}:{manifests.describe(d)}" for n, d in DOCUMENTS])
def test_manifest_is_valid(name: str, document: dict[str, Any], version: str) -> None:
    assert manifests.schema_file(version, document).is_file() or version == manifests.NEWEST
    manifests.validate(document, version)
    print(f"Kubernetes {version}: {name}: {manifests.describe(document)}: valid")


def test_max_surge_is_unknown_to_1_20_and_known_later() -> None:
    # Why the DaemonSet leaves maxSurge at its default: 1.20 refuses the field.
    daemonset = _daemonset()
    daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 0
    with pytest.raises(jsonschema.ValidationError, match="'maxSurge' was unexpected"):
        manifests.validate(daemonset, manifests.OLDEST)
    manifests.validate(daemonset, manifests.NEWEST)


def test_surge_variant_is_valid_for_the_newest_only() -> None:
    # k8s/surge/ is for 1.22+ (validated against the newest schema); 1.20 refuses it, hence k8s/.
    surge = manifests.surge_daemonset()
    assert surge["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    manifests.validate(surge, manifests.NEWEST)
    with pytest.raises(jsonschema.ValidationError, match="'maxSurge' was unexpected"):
        manifests.validate(surge, manifests.OLDEST)


@pytest.mark.parametrize("version", VERSIONS)
def test_unknown_and_mistyped_fields_are_rejected(version: str) -> None:
    misspelt = _daemonset()
    misspelt["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"memory": "1Gi"}
    with pytest.raises(jsonschema.ValidationError, match="'limit' was unexpected"):
        manifests.validate(misspelt, version)
    mistyped = _daemonset()
    mistyped["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(jsonschema.ValidationError, match="'http' is not of type 'integer'"):
        manifests.validate(mistyped, version)
