#!/usr/bin/env bash
# The acceptance test (tests/e2e/acceptance.py) on realk8s, a real single-node Kubernetes 1.20
# that runs on this machine: starts it, builds the image with Bazel and loads it, runs the test,
# and stops the cluster again, also on failure (then printing the cluster's logs first).
#
#   tests/e2e/realk8s.sh            # what .ci/run does
#   tests/e2e/realk8s.sh --keep     # leave the cluster running afterwards
#   tests/e2e/realk8s.sh -- --skip_reconfigure    # arguments after -- go to acceptance.py
#
# realk8s is found beside the repository, in ../shared/realk8s (REALK8S_SCRIPTS overrides that).
# The first start builds Kubernetes from Debian's sources (about 4 minutes on 2 cores; cached in
# $REALK8S_DIR, default /tmp/realk8s); later starts take 10-25 s.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
realk8s="${REALK8S_SCRIPTS:-$repo/../shared/realk8s}"
keep=0
while (($#)); do
  case "$1" in
    --keep) keep=1; shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [--keep] [-- ACCEPTANCE_ARGS...]" >&2; exit 2 ;;
  esac
done
[[ -f "$realk8s/up.sh" ]] || { echo "e2e: realk8s not found at $realk8s (set REALK8S_SCRIPTS)" >&2; exit 1; }
cd "$repo"

log() { echo "[e2e $(date +%T)] $*" >&2; }
started=$SECONDS

# What realk8s needs that a fresh Debian 12 machine may lack (its README: runc, iptables), and
# kubectl (Debian's kubernetes-client is kubectl 1.20.2, the cluster's own version).
missing=()
command -v runc >/dev/null || missing+=(runc)
command -v iptables >/dev/null || missing+=(iptables)
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cleanup() {
  local rc=$?
  if ((rc != 0)); then
    log "FAILED (exit $rc): the cluster's logs follow"
    bash "$realk8s/logs.sh" -n 80 || true
  fi
  if ((keep)); then
    log "cluster left running (--keep): stop it with $realk8s/down.sh"
  else
    bash "$realk8s/down.sh" || rc=$((rc ? rc : 1))
  fi
  log "done in $((SECONDS - started))s"
  exit "$rc"
}
trap cleanup EXIT

log "starting realk8s"
bash "$realk8s/up.sh"
eval "$(bash "$realk8s/env.sh")"

# The image `tools/bazel run //:image` loads into podman, written as a docker-archive instead.
image_tar="$(mktemp -d)/token-resource.tar"
log "building the image"
tools/bazel run //:image -- --output "$image_tar"
bash "$realk8s/load-image.sh" "$image_tar" >/dev/null
rm -rf "$(dirname "$image_tar")"

# The test Deployment's image, under the name the manifest uses (the cluster has no registry):
# the pause image realk8s already holds as its pod sandbox.
workload_image="$(sed -n 's/^ *image: *//p' k8s/token-resource-test.yaml)"
pause_tar="$(mktemp -d)/pause.tar"
$REALK8S_CTR images export "$pause_tar" k8s.gcr.io/pause:3.2
bash "$realk8s/load-image.sh" "$pause_tar" "$workload_image" >/dev/null
rm -rf "$(dirname "$pause_tar")"

log "running the acceptance test"
python3 tests/e2e/acceptance.py \
  --busybox_image=localhost/busybox:local \
  --restart_kubelet="bash '$realk8s/restart-kubelet.sh'" \
  "$@"
