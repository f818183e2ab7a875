"""What one device plugin serves, and the kubelet's rules for each setting.

Validation here is the kubelet's own (IsExtendedResourceName, endpoint handling), so a bad
setting fails at start-up with one clear line instead of as a silent registration failure.
"""

import dataclasses
import os
import re

DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"

# A DNS-1123 subdomain label, lower case; the name part of a qualified name.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


class ConfigError(ValueError):
    """A setting the kubelet would refuse or that cannot work; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    """One extended resource served on one socket in the kubelet's device-plugin directory."""

    resource: str
    count: int
    socket: str
    plugin_dir: str = DEFAULT_PLUGIN_DIR

    @property
    def socket_path(self) -> str:
        return os.path.join(self.plugin_dir, self.socket)

    @property
    def kubelet_socket_path(self) -> str:
        return os.path.join(self.plugin_dir, KUBELET_SOCKET)


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
            f'resource name "{name}": domain "{domain}" must be a lower-case DNS subdomain '
            "of at most 244 characters"
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
