"""What the daemon serves: flags or a configuration file, and the kubelet's rules for each
setting.

Validation here is the kubelet's own (IsExtendedResourceName, endpoint handling, the 4 MiB
message limit), so a bad setting fails with one clear line instead of as a silent
registration failure. A configuration file declares one or more resources, each with a count
and optional per-node counts; the ConfigMap in k8s/base/token-resource.yaml is a commented example.
"""

import dataclasses
import os
import re
from typing import Any

from token_resource import tokens
from token_resource.kubelet import DEFAULT_REGISTRY_DIR, KUBELET_SOCKET, Endpoint, Registration

DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_SOCKET = "token-resource.sock"
# sockaddr_un.sun_path holds 108 bytes, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

# A DNS-1123 subdomain label, lower case; the name part of a qualified name.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


class ConfigError(ValueError):
    """A setting the kubelet would refuse or that cannot work; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    """One extended resource: its count, served on a socket in the kubelet's device-plugin
    directory (a socket of each process's own unless the name was given: see kubelet.Endpoint)."""

    resource: str
    count: int
    socket: str
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    per_instance: bool = False
    registration: Registration = Registration.KUBELET
    registry_dir: str = DEFAULT_REGISTRY_DIR

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(
            self.resource, self.socket, self.plugin_dir, self.per_instance, self.registration, self.registry_dir
        )


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the kubelet's directories are on this node, and the registration to use where a
    resource does not choose one."""

    plugin_dir: str = DEFAULT_PLUGIN_DIR
    registry_dir: str = DEFAULT_REGISTRY_DIR
    registration: Registration = Registration.KUBELET


def check_resource_name(name: str) -> None:
    """Raises ConfigError unless the kubelet accepts `name` as an extended resource name."""
    if "/" not in name:
        raise ConfigError(f'resource name "{name}" needs a domain prefix, e.g. example.com/{name}')
    if "kubernetes.io/" in name:
        raise ConfigError(f'resource name "{name}": the kubernetes.io domain is reserved')
    if name.startswith("requests."):
        raise ConfigError(f'resource name "{name}" must not start with "requests."')
    domain, _, part = name.partition("/")
    if "/" in part:
        raise ConfigError(f'resource name "{name}" must have exactly one "/"')
    labels = domain.split(".")
    if len("requests." + domain) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f'resource name "{name}": domain "{domain}" must be a lower-case DNS subdomain of at most 244 characters'
        )
    if not (len(part) <= 63 and _NAME_PART.fullmatch(part)):
        raise ConfigError(
            f'resource name "{name}": name "{part}" must be 1-63 characters of [A-Za-z0-9._-], '
            "starting and ending with a letter or digit"
        )


def check_socket_name(socket: str) -> None:
    """The kubelet joins the endpoint onto its directory, so only a bare file name works."""
    if not socket or "/" in socket or socket in (".", "..") or "\0" in socket:
        raise ConfigError(f'socket "{socket}" must be a bare file name such as token-resource.sock')
    if socket == KUBELET_SOCKET:
        raise ConfigError(f'socket "{socket}" is the kubelet\'s own socket; choose another name')


def check_count(count: int, minimum: int = 1) -> None:
    if count < minimum:
        raise ConfigError(f"must be {'a positive integer' if minimum else 'zero or more'}, not {count}")
    limit = tokens.max_count()
    if count > limit:
        raise ConfigError(
            f"{count} is too large: one ListAndWatch snapshot must stay under the kubelet's "
            f"4 MiB message limit, which fits at most {limit} tokens"
        )


def check_plugin(plugin: PluginConfig) -> None:
    """Checks what single settings cannot show: the socket path must fit a sockaddr_un."""
    path = plugin.endpoint.longest_socket_path
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; choose a shorter socket name"
        )


def default_socket(resource: str) -> str:
    """example.com/token -> token-resource-example.com_token.sock"""
    return f"token-resource-{resource.replace('/', '_')}.sock"


def parse_registration(value: object) -> Registration:
    for registration in Registration:
        if value == registration.value:
            return registration
    choices = " or ".join(r.value for r in Registration)
    raise ConfigError(f"registration must be {choices}, not {value!r}")


_RESOURCE_KEYS = {"name", "count", "socket", "nodes", "registration"}


def parse_config(text: str, placement: Placement, node_name: str | None) -> tuple[PluginConfig, ...]:
    """The resources a configuration file declares, with the counts for `node_name`.

    Raises ConfigError naming the offending entry; the file is accepted or refused whole.
    """
    import yaml  # here, so that only --config loads it (~0.8 MB and ~13 ms of start-up)

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"not valid YAML or JSON{line}: {getattr(error, 'problem', error)}") from None
    if not isinstance(document, dict) or not isinstance(document.get("resources"), list):
        raise ConfigError('expected a mapping with a list under "resources"')
    unknown = set(document) - {"resources"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {_names(unknown)}; the only key is resources")
    if not document["resources"]:
        raise ConfigError("resources is empty; declare at least one resource")
    plugins = [_parse_resource(i, entry, placement, node_name) for i, entry in enumerate(document["resources"])]
    for attribute in ("resource", "socket"):
        values = [getattr(p, attribute) for p in plugins]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ConfigError(f"{attribute} {duplicates[0]} is declared more than once")
    variables: dict[str, str] = {}
    for plugin in plugins:  # a container holding both would see only one of them
        other = variables.setdefault(tokens.env_name(plugin.resource), plugin.resource)
        if other != plugin.resource:
            raise ConfigError(
                f"{other} and {plugin.resource} would both set ${tokens.env_name(other)} in containers; rename one"
            )
    return tuple(plugins)


def _names(keys: set[Any]) -> list[str]:
    return sorted(map(str, keys))


def _parse_resource(index: int, entry: Any, placement: Placement, node_name: str | None) -> PluginConfig:
    where = f"resources[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with name and count")
    unknown = set(entry) - _RESOURCE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {_names(unknown)}; known keys: {_names(_RESOURCE_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name is required, e.g. name: example.com/token")
    where = f"{where} ({name})"
    try:
        check_resource_name(name)
        count = _count(entry.get("count", 1), f"{where}: count")
        nodes = entry.get("nodes") or {}
        if not isinstance(nodes, dict):
            raise ConfigError(f"{where}: nodes must map node names to counts")
        for node in nodes:
            if not isinstance(node, str):  # YAML turns 010, yes or null into numbers, booleans, None
                raise ConfigError(f"{where}: node name {node!r} is not a string; quote it")
        overrides = {node: _count(value, f"{where}: nodes.{node}") for node, value in nodes.items()}
        per_instance = "socket" not in entry
        socket = entry.get("socket", default_socket(name))
        if not isinstance(socket, str):
            raise ConfigError(f"{where}: socket must be a file name")
        check_socket_name(socket)
        registration = parse_registration(entry.get("registration", placement.registration.value))
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    if node_name is not None and node_name in overrides:
        count = overrides[node_name]
    plugin = PluginConfig(
        resource=name,
        count=count,
        socket=socket,
        plugin_dir=placement.plugin_dir,
        per_instance=per_instance,
        registration=registration,
        registry_dir=placement.registry_dir,
    )
    check_plugin(plugin)
    return plugin


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    try:
        check_count(value, minimum=0)
    except ConfigError as error:
        raise ConfigError(f"{where} {error}") from None
    return value
