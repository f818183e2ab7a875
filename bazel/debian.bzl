"""debian_packages: the .debs pinned in a lock file, one filegroup per architecture.

The lock (written by `tools/bazel run //third_party/debian:lock`) lists, per architecture,
each package's name, version, URLs and sha256. This rule downloads them (Bazel tries the
deb.debian.org URL, then the snapshot.debian.org one that outlives a superseded version; it
checks every hash and keeps the files in its repository cache) and exposes:

    @<name>//:amd64, @<name>//:arm64     all .debs of that architecture, sorted by name
    @<name>//<arch>:<package>            one .deb
"""

def _debian_packages_impl(rctx):
    lock = json.decode(rctx.read(rctx.attr.lock))
    top = ["package(default_visibility = [\"//visibility:public\"])", ""]
    for arch, packages in sorted(lock["packages"].items()):
        build = ["package(default_visibility = [\"//visibility:public\"])", ""]
        files = []
        for pkg in packages:
            filename = "%s_%s_%s.deb" % (pkg["name"], pkg["version"].replace(":", "%3a"), pkg["arch"])
            rctx.download(
                url = [pkg["url"], pkg["snapshot_url"]],
                output = "%s/%s" % (arch, filename),
                sha256 = pkg["sha256"],
            )
            build.append("filegroup(name = %r, srcs = [%r])" % (pkg["name"], filename))
            files.append("//%s:%s" % (arch, filename))
        rctx.file(arch + "/BUILD.bazel", "\n".join(build) + "\n")
        top.append("filegroup(name = %r, srcs = %r)" % (arch, files))
    rctx.file("BUILD.bazel", "\n".join(top) + "\n")

debian_packages = repository_rule(
    implementation = _debian_packages_impl,
    attrs = {
        "lock": attr.label(mandatory = True, allow_single_file = True),
    },
)
