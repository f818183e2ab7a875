#!/bin/sh
echo "coverage tools are not available with the offline Debian Bazel" >&2
exit 1
