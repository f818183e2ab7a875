#!/usr/bin/env bash
# The end-to-end tests on realk8s, a real single-node Kubernetes 1.20 that runs on this machine:
# starts it, builds the image with Bazel and loads it, runs the acceptance test
# (tests/e2e/acceptance.py), then the disruption suite (tests/e2e/disruption.py), and stops the
# cluster again, also on failure (then printing the cluster's logs first).
#
#   tests/e2e/realk8s.sh                         # what .ci/run does: acceptance, then disruptions at CI size
#   tests/e2e/realk8s.sh --keep                  # leave the cluster running afterwards
#   tests/e2e/realk8s.sh --disruptions full      # 10 repeats of each disruption (about 45 minutes)
#   tests/e2e/realk8s.sh --disruptions off       # the acceptance test only
#   tests/e2e/realk8s.sh --acceptance off        # the disruption suite only
#   tests/e2e/realk8s.sh --image_tar /tmp/x.tar  # an image built before (docker-archive or OCI), not Bazel's
#   tests/e2e/realk8s.sh -- --skip_reconfigure   # arguments after -- go to acceptance.py
#   tests/e2e/realk8s.sh --disruption_arg=--repeats=3 --disruption_arg=--disruptions=surge,pod-delete
#
# realk8s is found beside the repository, in ../shared/realk8s (REALK8S_SCRIPTS overrides that).
# The first start builds Kubernetes from Debian's sources (about 4 minutes on 2 cores; cached in
# $REALK8S_DIR, default /tmp/realk8s); later starts take 10-25 s. A cluster that already runs is
# used as it is (and stopped at the end unless --keep).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
realk8s="${REALK8S_SCRIPTS:-$repo/../shared/realk8s}"
keep=0
disruptions=ci
acceptance=on
image_tar=
disruption_args=()
usage="usage: $0 [--keep] [--disruptions ci|full|off] [--acceptance on|off] [--image_tar TAR] [--disruption_arg ARG]... [-- ACCEPTANCE_ARGS...]"
while (($#)); do
  case "$1" in
    --keep) keep=1; shift ;;
    --disruptions) disruptions="${2:-}"; shift 2 ;;
    --disruptions=*) disruptions="${1#*=}"; shift ;;
    --acceptance) acceptance="${2:-}"; shift 2 ;;
    --acceptance=*) acceptance="${1#*=}"; shift ;;
    --image_tar) image_tar="${2:-}"; shift 2 ;;
    --image_tar=*) image_tar="${1#*=}"; shift ;;
    --disruption_arg) disruption_args+=("${2:-}"); shift 2 ;;
    --disruption_arg=*) disruption_args+=("${1#*=}"); shift ;;
    --) shift; break ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$disruptions" in ci | full | off) ;; *) echo "$usage" >&2; exit 2 ;; esac
case "$acceptance" in on | off) ;; *) echo "$usage" >&2; exit 2 ;; esac
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

if [[ -n "$image_tar" ]]; then
  log "loading $image_tar as token-resource:latest"
  bash "$realk8s/load-image.sh" "$image_tar" token-resource:latest >/dev/null
else
  # The image `tools/bazel run //:image` loads into podman, written as a docker-archive instead.
  image_tar="$(mktemp -d)/token-resource.tar"
  log "building the image"
  tools/bazel run //:image -- --output "$image_tar"
  bash "$realk8s/load-image.sh" "$image_tar" >/dev/null
  rm -rf "$(dirname "$image_tar")"
fi

# The test Deployment's image, under the name the manifest uses (the cluster has no registry):
# the pause image realk8s already holds as its pod sandbox.
workload_image="$(sed -n 's/^ *image: *//p' k8s/token-resource-test.yaml)"
pause_tar="$(mktemp -d)/pause.tar"
$REALK8S_CTR images export "$pause_tar" k8s.gcr.io/pause:3.2
bash "$realk8s/load-image.sh" "$pause_tar" "$workload_image" >/dev/null
rm -rf "$(dirname "$pause_tar")"

if [[ "$acceptance" == on ]]; then
  log "running the acceptance test (registration on kubelet.sock: k8s/)"
  python3 tests/e2e/acceptance.py \
    --busybox_image=localhost/busybox:local \
    --restart_kubelet="bash '$realk8s/restart-kubelet.sh'" \
    "$@"
  # The ConfigMap step is the same in both modes: run it once, above.
  log "running the acceptance test (registration through the plugin watcher: k8s/plugin-watcher/)"
  python3 tests/e2e/acceptance.py \
    --install=k8s/plugin-watcher \
    --skip_reconfigure \
    --busybox_image=localhost/busybox:local \
    --restart_kubelet="bash '$realk8s/restart-kubelet.sh'" \
    "$@"
fi

if [[ "$disruptions" != off ]]; then
  size=()
  [[ "$disruptions" == full ]] && size=(--full)
  log "running the disruption suite ($disruptions size)"
  python3 tests/e2e/disruption.py \
    --busybox_image=localhost/busybox:local \
    --pod_log_dir="$REALK8S_POD_LOG_DIR" \
    --restart_kubelet="bash '$realk8s/restart-kubelet.sh'" \
    --reboot="REALK8S_SCRIPTS='$realk8s' bash tests/e2e/realk8s_node.sh reboot" \
    --kill_container="REALK8S_SCRIPTS='$realk8s' bash tests/e2e/realk8s_node.sh kill-container {id}" \
    "${size[@]}" "${disruption_args[@]}"
fi
