"""proto_library, py_proto_library and py_grpc_library without a C++ toolchain.

Shaped like the rules of grpc's python_rules.bzl:

    proto_library(name = "x_proto", srcs = ["x/api.proto"])
    py_proto_library(name = "x_py_pb2", deps = [":x_proto"])
    py_grpc_library(name = "x_py_pb2_grpc", srcs = [":x_proto"], deps = [":x_py_pb2"])

Bazel 4's native proto_library needs protoc built from C++ sources; these rules run
grpc_tools.protoc from the pinned grpcio-tools wheel instead. Protos are imported relative to
the package of their proto_library, and the generated modules are importable the same way
(`from x import api_pb2`).
"""

ProtoSourcesInfo = provider(
    doc = "The .proto files of a proto_library and where their import paths start.",
    fields = {
        "srcs": "list of File: this library's own .proto files",
        "transitive_srcs": "depset of File: these and those of all dependencies",
        "import_roots": "depset of string: -I directories for protoc",
    },
)

def _relative_path(src):
    """The import path of a .proto file: its path below its package."""
    package = src.owner.package
    return src.short_path[len(package) + 1:] if package else src.short_path

def _import_root(src):
    return src.path[:-len(_relative_path(src))].rstrip("/") or "."

def _proto_library_impl(ctx):
    deps = [d[ProtoSourcesInfo] for d in ctx.attr.deps]
    return [
        ProtoSourcesInfo(
            srcs = ctx.files.srcs,
            transitive_srcs = depset(ctx.files.srcs, transitive = [d.transitive_srcs for d in deps]),
            import_roots = depset(
                [_import_root(src) for src in ctx.files.srcs],
                transitive = [d.import_roots for d in deps],
            ),
        ),
        DefaultInfo(files = depset(ctx.files.srcs)),
    ]

proto_library = rule(
    implementation = _proto_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".proto"]),
        "deps": attr.label_list(providers = [ProtoSourcesInfo]),
    },
)

def _generate(ctx, protos, suffixes, flags, runtime, deps):
    """Runs protoc on the protos' own sources; returns the generated code's providers."""
    srcs = [src for info in protos for src in info.srcs]
    outputs = []
    for src in srcs:
        if src.owner.package != ctx.label.package:
            fail("%s: generate code in the package of %s" % (ctx.label, src.owner))
        stem = _relative_path(src)[:-len(".proto")]
        outputs.extend([ctx.actions.declare_file(stem + suffix) for suffix in suffixes])
    out_root = "/".join([p for p in [ctx.bin_dir.path, ctx.label.workspace_root, ctx.label.package] if p])
    args = ctx.actions.args()
    args.add_all(depset(transitive = [i.import_roots for i in protos]), format_each = "-I%s")
    args.add_all(["%s=%s" % (flag, out_root) for flag in flags])
    args.add_all([_relative_path(src) for src in srcs])
    ctx.actions.run(
        executable = ctx.executable._protoc,
        arguments = [args],
        inputs = depset(transitive = [i.transitive_srcs for i in protos]),
        outputs = outputs,
        mnemonic = "GrpcToolsProtoc",
        progress_message = "Generating Python code for %s" % ctx.label,
    )
    py_deps = [runtime] + deps
    import_path = "/".join([p for p in [ctx.workspace_name, ctx.label.package] if p])
    return [
        DefaultInfo(
            files = depset(outputs),
            runfiles = ctx.runfiles(
                files = outputs,
                transitive_files = depset(transitive = [d[DefaultInfo].default_runfiles.files for d in py_deps]),
            ),
        ),
        PyInfo(
            transitive_sources = depset(outputs, transitive = [d[PyInfo].transitive_sources for d in py_deps]),
            imports = depset([import_path], transitive = [d[PyInfo].imports for d in py_deps]),
        ),
    ]

def _py_proto_library_impl(ctx):
    return _generate(
        ctx,
        protos = [d[ProtoSourcesInfo] for d in ctx.attr.deps],
        suffixes = ["_pb2.py", "_pb2.pyi"],
        flags = ["--python_out", "--pyi_out"],
        runtime = ctx.attr._runtime,
        deps = [],
    )

def _py_grpc_library_impl(ctx):
    return _generate(
        ctx,
        protos = [d[ProtoSourcesInfo] for d in ctx.attr.srcs],
        suffixes = ["_pb2_grpc.py"],
        flags = ["--grpc_python_out"],
        runtime = ctx.attr._runtime,
        deps = ctx.attr.deps,
    )

_PROTOC = attr.label(
    default = "//bazel/tools:protoc",
    executable = True,
    cfg = "exec",
)

py_proto_library = rule(
    implementation = _py_proto_library_impl,
    attrs = {
        "deps": attr.label_list(providers = [ProtoSourcesInfo], mandatory = True),
        "_protoc": _PROTOC,
        "_runtime": attr.label(default = "@pypi//protobuf", providers = [PyInfo]),
    },
)

py_grpc_library = rule(
    implementation = _py_grpc_library_impl,
    attrs = {
        "srcs": attr.label_list(providers = [ProtoSourcesInfo], mandatory = True),
        "deps": attr.label_list(providers = [PyInfo], mandatory = True),
        "_protoc": _PROTOC,
        "_runtime": attr.label(default = "@pypi//grpcio", providers = [PyInfo]),
    },
)
