"""OCI image rules without Docker, shaped like rules_oci's API (which is not reachable offline).

    load("//bazel/oci:defs.bzl", "oci_image", "oci_image_index", "oci_load", "oci_push")

    oci_image(name, base = None, tars = [], entrypoint = [], cmd = [], env = {}, labels = {},
              annotations = {}, user = "", workdir = "", os = "", architecture = "", variant = "",
              stamp = -1)
        An OCI image layout directory `name` and `name.digest` (the manifest digest). `tars` are
        gzipped layers added on top of `base`'s, in order (least often changed first). A new
        entrypoint resets cmd. Env values may extend the base's with $VAR. Label and annotation
        values may name workspace status keys in braces ({STABLE_SOURCE_REVISION}); they are
        replaced when the target is stamped (stamp = 1, or stamp = -1 and --stamp).

    oci_image_index(name, images)
        A multi-platform image index over oci_image targets; `name.digest` is the index digest.

    oci_load(name, image, repo_tags)
        `bazel run :name [-- --tag T --platform os/arch --engine podman|docker --output FILE]`
        loads the host's (or the chosen) platform of the image into podman or docker.

    oci_push(name, image, repository = "", remote_tags = [])
        `bazel run :name [-- --repository HOST/NAME --tag T]` pushes over the OCI distribution API.

Layers come from deb_layer (unpacked .debs), py_layer (Python targets and their wheels, with
hash-based .pyc files) and oci_layer (single files, generated text, symlinks).
"""

load("//bazel/oci/private:image.bzl", "oci_image_rule")
load("//bazel/oci/private:index.bzl", "oci_image_index_rule")
load("//bazel/oci/private:layer.bzl", _PyLayerInfo = "PyLayerInfo", _deb_layer = "deb_layer", _oci_layer = "oci_layer", _py_layer = "py_layer")
load("//bazel/oci/private:run.bzl", "oci_load_rule", "oci_push_rule")

PyLayerInfo = _PyLayerInfo
deb_layer = _deb_layer
oci_layer = _oci_layer
py_layer = _py_layer

_STAMP_FLAG = select({
    "//bazel/oci:stamp": True,
    "//conditions:default": False,
})

def oci_image(name, **kwargs):
    oci_image_rule(name = name, private_stamp_detect = _STAMP_FLAG, **kwargs)

def oci_image_index(name, images, **kwargs):
    oci_image_index_rule(name = name, images = images, **kwargs)

def oci_load(name, image, repo_tags, **kwargs):
    oci_load_rule(name = name, image = image, repo_tags = repo_tags, **kwargs)

def oci_push(name, image, repository = "", remote_tags = [], **kwargs):
    oci_push_rule(name = name, image = image, repository = repository, remote_tags = remote_tags, **kwargs)
