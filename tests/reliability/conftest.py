"""The shared fixtures of tests/conftest.py (plugin_dir, kubelets, kubelet, daemons), for this directory."""

from tests.conftest import daemons, kubelet, kubelets, plugin_dir  # noqa: F401  (pytest fixtures)
