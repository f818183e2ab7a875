#!/usr/bin/env bash
# The edit loop's figure: warm `tools/bazel test //...` after a one-line change to a daemon
# module (a comment in token_resource/tokens.py), N times (default 3), each with a different
# comment so that no result comes from Bazel's cache. Prints each wall time and the median, beside
# the same command with nothing changed (every result cached: Bazel's own floor).
# Run it from the repository root on an otherwise idle machine: bench/inner_loop.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
target=token_resource/tokens.py
git diff --quiet -- "$target" || { echo "inner_loop: $target has uncommitted changes; commit or stash them first" >&2; exit 2; }
trap 'git checkout -q -- "$target"' EXIT

tools/bazel test //... >/dev/null 2>&1 || { echo "inner_loop: the tests fail before any change; fix them first" >&2; exit 1; }
start=$(date +%s%N)
tools/bazel test //... >/dev/null 2>&1
end=$(date +%s%N)
floor=$(( (end - start) / 1000000 ))
times=()
for i in $(seq "$runs"); do
    git checkout -q -- "$target"
    printf '\n\n# inner-loop change %s %s\n' "$i" "$(date +%s%N)" >>"$target"
    start=$(date +%s%N)
    tools/bazel test //... >/dev/null 2>&1
    end=$(date +%s%N)
    times+=("$(( (end - start) / 1000000 ))")
    printf 'run %d: %d.%03d s\n' "$i" $(( times[-1] / 1000 )) $(( times[-1] % 1000 ))
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
printf 'median of %d: %d.%03d s (nothing changed: %d.%03d s)\n' "$runs" $(( median / 1000 )) $(( median % 1000 )) \
    $(( floor / 1000 )) $(( floor % 1000 ))
