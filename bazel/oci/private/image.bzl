"""oci_image_rule: see //bazel/oci:defs.bzl."""

load(":common.bzl", "layout_dir")

def stamp_files(ctx):
    """The workspace status files, when this target is stamped (stamp = 1, or -1 with --stamp)."""
    if ctx.attr.stamp == 1 or (ctx.attr.stamp == -1 and ctx.attr.private_stamp_detect):
        return [ctx.info_file]
    return []

def _oci_image_impl(ctx):
    layout = ctx.actions.declare_directory(ctx.label.name)
    digest = ctx.actions.declare_file(ctx.label.name + ".digest")
    settings = {
        "os": ctx.attr.os,
        "architecture": ctx.attr.architecture,
        "variant": ctx.attr.variant,
        "entrypoint": ctx.attr.entrypoint if ctx.attr.entrypoint else None,
        "cmd": ctx.attr.cmd if ctx.attr.cmd else None,
        "env": ctx.attr.env,
        "labels": ctx.attr.labels,
        "annotations": ctx.attr.annotations,
        "user": ctx.attr.user,
        "workdir": ctx.attr.workdir,
        "layer_comments": [str(t.label) for t in ctx.attr.tars],
    }
    settings_file = ctx.actions.declare_file(ctx.label.name + ".settings.json")
    ctx.actions.write(settings_file, json.encode(settings))
    stamp = stamp_files(ctx) + ctx.files.stamp_files
    args = ctx.actions.args()
    args.add("--settings", settings_file)
    args.add("--output", layout.path)
    args.add("--digest", digest)
    inputs = [settings_file] + ctx.files.tars + stamp
    if ctx.attr.base:
        base = layout_dir(ctx.attr.base)
        args.add("--base", base.path)
        inputs.append(base)
    args.add_all(ctx.files.tars, before_each = "--layer")
    args.add_all(stamp, before_each = "--stamp_info")
    ctx.actions.run(
        executable = ctx.executable._image,
        arguments = [args],
        inputs = inputs,
        outputs = [layout, digest],
        mnemonic = "OciImage",
        progress_message = "Assembling OCI image %s" % ctx.label,
    )
    return [
        DefaultInfo(files = depset([layout, digest]), runfiles = ctx.runfiles(files = [layout, digest])),
        OutputGroupInfo(settings = depset([settings_file])),
    ]

oci_image_rule = rule(
    implementation = _oci_image_impl,
    attrs = {
        "base": attr.label(doc = "an oci_image to build on"),
        "tars": attr.label_list(allow_files = [".tar.gz"], doc = "gzipped layer tarballs, in order"),
        "entrypoint": attr.string_list(),
        "cmd": attr.string_list(),
        "env": attr.string_dict(),
        "labels": attr.string_dict(),
        "annotations": attr.string_dict(),
        "user": attr.string(),
        "workdir": attr.string(),
        "os": attr.string(),
        "architecture": attr.string(),
        "variant": attr.string(),
        "stamp": attr.int(default = -1, values = [-1, 0, 1]),
        "stamp_files": attr.label_list(
            allow_files = True,
            doc = "more `KEY value` lines for the {KEY} placeholders, used whether stamped or not",
        ),
        "private_stamp_detect": attr.bool(doc = "set by the oci_image macro: whether --stamp is on"),
        "_image": attr.label(default = "//bazel/oci:image", executable = True, cfg = "exec"),
    },
)
