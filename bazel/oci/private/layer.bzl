"""Layer rules: each writes a JSON spec and runs //bazel/oci:layer on it (see layer.py)."""

PyLayerInfo = provider(
    doc = "What a py_layer put in its layer.",
    fields = {"packages": "list of string: the third-party packages (repository/package) it holds"},
)

def _entry(file, dest = None):
    entry = {"src": file.path, "short": file.short_path}
    if dest != None:
        entry["dest"] = dest
    return entry

def _run_layer(ctx, spec, inputs):
    spec_file = ctx.actions.declare_file(ctx.label.name + ".spec.json")
    ctx.actions.write(spec_file, json.encode(spec))
    out = ctx.actions.declare_file(ctx.label.name + ".tar.gz")
    ctx.actions.run(
        executable = ctx.executable._layer,
        arguments = ["--spec", spec_file.path, "--output", out.path],
        inputs = depset([spec_file], transitive = [inputs]),
        outputs = [out],
        mnemonic = "OciLayer",
        progress_message = "Writing image layer %s" % ctx.label,
        # Hash seeds must not matter: the test rebuilds the layers with random ones.
        env = {"PYTHONHASHSEED": "0"},
    )
    return out, spec_file

_LAYER_TOOL = attr.label(default = "//bazel/oci:layer", executable = True, cfg = "exec")

# deb_layer ---------------------------------------------------------------------------------------

def _deb_layer_impl(ctx):
    spec = {
        "debs": [_entry(f) for f in ctx.files.debs],
        "deb_exclude": ctx.attr.exclude,
        "deb_keep": ctx.attr.keep,
        "merged_usr": ctx.attr.merged_usr,
        "compile": ctx.attr.compile,
    }
    out, spec_file = _run_layer(ctx, spec, depset(ctx.files.debs))
    return [
        DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out])),
        OutputGroupInfo(spec = depset([spec_file]), inputs = depset(ctx.files.debs)),
    ]

deb_layer = rule(
    implementation = _deb_layer_impl,
    doc = "The unpacked data of .deb files (no maintainer scripts run), plus /var/lib/dpkg/status.d.",
    attrs = {
        "debs": attr.label_list(allow_files = [".deb"], mandatory = True),
        "exclude": attr.string_list(doc = "fnmatch patterns of paths (without leading /) to leave out"),
        "keep": attr.string_list(doc = "patterns kept even though `exclude` matches them"),
        "merged_usr": attr.bool(default = True, doc = "put /bin, /lib, /lib64, /sbin under /usr, as bookworm does"),
        "compile": attr.string_list(doc = "directories whose .py files get hash-based .pyc files"),
        "_layer": _LAYER_TOOL,
    },
)

# py_layer ----------------------------------------------------------------------------------------

def _runfiles_path(ctx, file):
    if file.short_path.startswith("../"):
        return file.short_path[3:]
    return ctx.workspace_name + "/" + file.short_path

def _longest_first(root):
    return -len(root)

def _dest(entry):
    return entry["dest"]

def _py_layer_impl(ctx):
    roots = {}
    files = []
    for dep in ctx.attr.deps:
        for root in dep[PyInfo].imports.to_list():
            roots[root] = True
        files.append(dep[DefaultInfo].default_runfiles.files)
    roots = sorted(roots.keys(), key = _longest_first)
    entries = []
    inputs = []
    packages = {}
    skipped = {}
    for file in depset(transitive = files).to_list():
        external = file.owner.workspace_name != ""
        if external and not ctx.attr.external:
            skipped[file.owner.package] = True
            continue
        if not external and not ctx.attr.main:
            continue
        if any([file.path.endswith(suffix) for suffix in ctx.attr.exclude_suffixes]):
            continue
        path = _runfiles_path(ctx, file)
        relative = None
        for root in roots:
            if path.startswith(root + "/"):
                relative = path[len(root) + 1:]
                break
        if relative == None:
            if external:
                fail("%s: %s is outside every import root of its package" % (ctx.label, file.short_path))
            relative = file.short_path
        entry = _entry(file, ctx.attr.prefix.rstrip("/") + "/" + relative)
        entry["mode"] = 493 if file.basename.endswith(".so") else 420  # 0o755 for extension modules, else 0o644
        entries.append(entry)
        inputs.append(file)
        if external:
            packages[file.owner.package] = True
    if ctx.attr.site:
        provided = ctx.attr.site[PyLayerInfo].packages
        missing = [p for p in sorted(skipped.keys()) if p not in provided]
        if missing:
            fail("%s: the program needs %s, which %s does not ship; add them there" % (ctx.label, missing, ctx.attr.site.label))
    spec = {
        "files": sorted(entries, key = _dest),
        "compile": [ctx.attr.prefix] if ctx.attr.compile else [],
    }
    out, spec_file = _run_layer(ctx, spec, depset(inputs))
    return [
        DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out])),
        OutputGroupInfo(spec = depset([spec_file]), inputs = depset(inputs)),
        PyLayerInfo(packages = sorted(packages.keys())),
    ]

py_layer = rule(
    implementation = _py_layer_impl,
    doc = """The Python files of py_library/py_binary targets and their runfiles, below `prefix`.

Each file goes to prefix + its path below its import root (the package's `imports`, or the
workspace root), so prefix is the one PYTHONPATH entry needed for them. `main`/`external`
choose this workspace's files and/or those of external repositories (third-party wheels).""",
    attrs = {
        "deps": attr.label_list(providers = [PyInfo], mandatory = True),
        "prefix": attr.string(mandatory = True),
        "main": attr.bool(default = True),
        "external": attr.bool(default = True),
        "exclude_suffixes": attr.string_list(default = [".pyi", ".pyc"]),
        "compile": attr.bool(default = True, doc = "add hash-based .pyc files"),
        "site": attr.label(
            providers = [PyLayerInfo],
            doc = "with external = False: the layer that ships the third-party packages; the build fails if it lacks one the deps need",
        ),
        "_layer": _LAYER_TOOL,
    },
)

# oci_layer ---------------------------------------------------------------------------------------

def _oci_layer_impl(ctx):
    spec = {
        "files": [_entry(target.files.to_list()[0], dest) for target, dest in ctx.attr.files.items()],
        "contents": ctx.attr.contents,
        "symlinks": ctx.attr.symlinks,
        "dirs": ctx.attr.dirs,
    }
    inputs = depset(ctx.files.files)
    out, spec_file = _run_layer(ctx, spec, inputs)
    return [DefaultInfo(files = depset([out]), runfiles = ctx.runfiles(files = [out])), OutputGroupInfo(spec = depset([spec_file]), inputs = inputs)]

oci_layer = rule(
    implementation = _oci_layer_impl,
    doc = "A layer of single files, generated text files, symlinks and directories.",
    attrs = {
        "files": attr.label_keyed_string_dict(allow_files = True, doc = "file -> path in the image"),
        "contents": attr.string_dict(doc = "path in the image -> text"),
        "symlinks": attr.string_dict(doc = "path in the image -> link target"),
        "dirs": attr.string_list(),
        "_layer": _LAYER_TOOL,
    },
)
