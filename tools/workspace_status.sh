#!/usr/bin/env bash
# Workspace status for stamped targets (.bazelrc: --workspace_status_command). Only STABLE_ keys,
# and only ones that depend on the source tree: two builds of one commit stamp the same bytes.
set -uo pipefail
revision="$(git rev-parse HEAD 2>/dev/null)" || revision="unknown"
if [[ "$revision" != unknown ]] && ! git diff-index --quiet HEAD -- 2>/dev/null; then
  revision="$revision-dirty"
fi
echo "STABLE_SOURCE_REVISION $revision"
