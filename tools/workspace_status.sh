#!/usr/bin/env bash
# Workspace status for stamped targets (.bazelrc: --workspace_status_command). Only STABLE_ keys,
# and only ones that depend on the source tree: two builds of one commit stamp the same bytes.
set -uo pipefail
revision="$(git rev-parse HEAD 2>/dev/null)" || revision="unknown"
# diff-index trusts the index's stat data: refresh it first, or a file that was merely touched
# counts as modified.
git update-index -q --refresh >/dev/null 2>&1 || true
if [[ "$revision" != unknown ]] && ! git diff-index --quiet HEAD -- 2>/dev/null; then
  revision="$revision-dirty"
fi
echo "STABLE_SOURCE_REVISION $revision"
