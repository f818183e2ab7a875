"""oci_image_index_rule: see //bazel/oci:defs.bzl."""

load(":common.bzl", "layout_dir")

def _oci_image_index_impl(ctx):
    layout = ctx.actions.declare_directory(ctx.label.name)
    digest = ctx.actions.declare_file(ctx.label.name + ".digest")
    images = [layout_dir(t) for t in ctx.attr.images]
    args = ctx.actions.args()
    args.add("--output", layout.path)
    args.add("--digest", digest)
    args.add_all(images, before_each = "--image", expand_directories = False)
    ctx.actions.run(
        executable = ctx.executable._index,
        arguments = [args],
        inputs = images,
        outputs = [layout, digest],
        mnemonic = "OciImageIndex",
        progress_message = "Assembling OCI image index %s" % ctx.label,
    )
    return [DefaultInfo(files = depset([layout, digest]), runfiles = ctx.runfiles(files = [layout, digest]))]

oci_image_index_rule = rule(
    implementation = _oci_image_index_impl,
    attrs = {
        "images": attr.label_list(mandatory = True, doc = "oci_image targets, one per platform"),
        "_index": attr.label(default = "//bazel/oci:index", executable = True, cfg = "exec"),
    },
)
