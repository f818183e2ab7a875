"""py_pytest_test: a py_test whose sources are run by pytest."""

def py_pytest_test(name, srcs, deps = [], args = [], size = "small", **kwargs):
    native.py_test(
        name = name,
        srcs = srcs + ["//bazel:pytest_main.py"],
        main = "//bazel:pytest_main.py",
        args = ["$(location %s)" % src for src in srcs] + args,
        deps = deps + ["@pypi//pytest"],
        size = size,
        **kwargs
    )
