"""The manifests in k8s/ and the Kubernetes JSON schemas they are validated against.

Schemas come from the kubernetes-validate package: its current release for the newest Kubernetes
the README claims, and the 1.20 directory of its 1.28.3 release (the last that ships it) for the
oldest. Both are the "strict" variants, which reject fields a version does not know.
"""

import json
import os
import pathlib
import re

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# The range the README claims; realk8s (tests/e2e) runs the oldest for real.
OLDEST = "1.20"
NEWEST = "1.37"

# Not resolved: under Bazel this file is a symlink in the runfiles tree, where the data is.
K8S_DIR = pathlib.Path(os.path.abspath(__file__)).parent
MANIFESTS = ("base/token-resource.yaml", "token-resource-test.yaml")
# The kustomizations: k8s/ (every version; rolling updates without surge) and k8s/surge/ (1.22+:
# the DaemonSet with maxSurge 1, maxUnavailable 0, patched onto base/ by surge/daemonset-surge.yaml).
KUSTOMIZATIONS = (
    "kustomization.yaml",
    "base/kustomization.yaml",
    "surge/kustomization.yaml",
    "plugin-watcher/kustomization.yaml",
)
SURGE_PATCH = "surge/daemonset-surge.yaml"
# k8s/plugin-watcher/ (every version): registration through the kubelet's plugin watcher.
WATCHER_PATCH = "plugin-watcher/daemonset-plugin-watcher.yaml"


def load_documents(path: pathlib.Path) -> list[dict]:
    """The non-empty YAML documents of a manifest file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _schema_dir(version: str) -> pathlib.Path:
    if version == NEWEST:
        return (
            pathlib.Path(str(kubernetes_validate.__file__)).parent
            / "kubernetes-json-schema"
            / f"v{version}.0-local-strict"
        )
    if version == OLDEST:
        # Bazel puts the http_archive next to this workspace in the runfiles tree.
        root = pathlib.Path(os.environ.get("TEST_SRCDIR") or os.environ.get("RUNFILES_DIR") or K8S_DIR.parent.parent)
        return root / "kubernetes_json_schema_v1_20" / "v1.20.0-local-strict"
    raise ValueError(f"no schemas for Kubernetes {version}")


def schema_file(version: str, document: dict) -> pathlib.Path:
    """kubernetes-validate's naming: kind, then the API group's first label and version."""
    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", document["apiVersion"])
    return _schema_dir(version) / f"{document['kind'].lower()}-{api_version}.json"


def _merge(base: dict, patch: dict) -> dict:
    """A strategic merge patch of maps only (what surge/daemonset-surge.yaml is)."""
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def surge_daemonset() -> dict:
    """The DaemonSet that `kubectl kustomize k8s/surge` renders (//k8s:kustomize_test checks that)."""
    [daemonset] = [d for d in load_documents(K8S_DIR / MANIFESTS[0]) if d["kind"] == "DaemonSet"]
    [patch] = load_documents(K8S_DIR / SURGE_PATCH)
    return _merge(daemonset, {"spec": patch["spec"]})


def validate(document: dict, version: str) -> None:
    """Raises jsonschema.ValidationError (or FileNotFoundError for an unknown kind) if the
    document is not valid for that Kubernetes version."""
    if version == NEWEST:
        # The package's own entry point (its ValidationError is a jsonschema.ValidationError).
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as error:
            raise FileNotFoundError(error.message) from None
        return
    schema = json.loads(schema_file(version, document).read_text())
    definitions = json.loads((_schema_dir(version) / "_definitions.json").read_text())
    registry = Registry().with_resource("_definitions.json", Resource.from_contents(definitions, DRAFT202012))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    validator.validate(document)


def describe(document: dict) -> str:
    meta = document.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{document['kind']} {where}{meta.get('name')}"


def main() -> None:
    """Prints the validator's verdict for every manifest and version (`bazel run //k8s:validate`)."""
    failed = 0
    for version in (OLDEST, NEWEST):
        for name in MANIFESTS:
            for document in load_documents(K8S_DIR / name):
                try:
                    validate(document, version)
                    verdict = "valid"
                except (jsonschema.ValidationError, FileNotFoundError) as error:
                    failed += 1
                    verdict = f"INVALID: {getattr(error, 'message', error)}"
                print(f"Kubernetes {version}: {name}: {describe(document)} ({document['apiVersion']}): {verdict}")
    # The surge variant is for 1.22+: checked against the newest schema only.
    try:
        validate(surge_daemonset(), NEWEST)
        verdict = "valid"
    except jsonschema.ValidationError as error:
        failed += 1
        verdict = f"INVALID: {error.message}"
    print(f"Kubernetes {NEWEST}: surge/ (kubectl kustomize): DaemonSet with maxSurge: {verdict}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
