#!/usr/bin/env bash
# Node-level disruptions on the realk8s node, for tests/e2e/disruption.py (run as root on the
# machine that runs realk8s; it reads realk8s's env.sh and its recorded kubelet PID, and changes
# nothing in the realk8s folder).
#
#   realk8s_node.sh kill-container CONTAINER_ID     # SIGKILL one container (the kubelet restarts it in place)
#   realk8s_node.sh reboot [NAMESPACE...]           # an emulated node reboot, see below
#
# reboot: the kubelet is stopped (SIGTERM to its recorded PID, as restart-kubelet.sh does), every
# container's task is SIGKILLed through the cluster's containerd (pod sandboxes included; with
# NAMESPACEs, only the containers of pods in those namespaces), and the kubelet is started again
# with its state in place (/var/lib/kubelet, the device-manager checkpoint) by restart-kubelet.sh,
# which returns once the node is Ready. What differs from a real reboot: containerd keeps running
# and keeps the dead containers' records (the kubelet sees them exited, as after a reboot it finds
# none), and the files in the device-plugin directory stay until the kubelet deletes them at start
# (as a real one does).
set -euo pipefail
realk8s="${REALK8S_SCRIPTS:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/../shared/realk8s}"
eval "$(bash "$realk8s/env.sh")"
read -r -a ctr <<<"$REALK8S_CTR"
log() { echo "[realk8s_node $(date +%T.%N | cut -c1-12)] $*" >&2; }

start_time() { # field 22 of /proc/PID/stat, as realk8s records it
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  set -- $s
  echo "${20}"
}

stop_kubelet() {
  local pid st i
  read -r pid st <"$REALK8S_DIR/run/kubelet.pid" || { log "no recorded kubelet"; return 0; }
  [[ "$(start_time "$pid" || true)" == "$st" ]] || { log "kubelet $pid is not running"; return 0; }
  kill -TERM "$pid"
  for ((i = 0; i < 200; i++)); do
    [[ "$(start_time "$pid" || true)" == "$st" ]] || { log "kubelet $pid stopped"; return 0; }
    sleep 0.1
  done
  log "kubelet $pid ignored SIGTERM for 20s: SIGKILL"
  kill -KILL "$pid"
}

kill_tasks() { # [NAMESPACE...]: SIGKILL the running tasks (all, or those of pods in the namespaces)
  local ids=() id
  if (($#)); then
    local namespace
    for namespace in "$@"; do
      mapfile -t -O "${#ids[@]}" ids < <("${ctr[@]}" containers ls -q "labels.\"io.kubernetes.pod.namespace\"==$namespace")
    done
  else
    mapfile -t ids < <("${ctr[@]}" containers ls -q)
  fi
  local killed=0
  for id in "${ids[@]}"; do
    if "${ctr[@]}" tasks kill -s SIGKILL "$id" 2>/dev/null; then killed=$((killed + 1)); fi
  done
  log "SIGKILLed $killed running task(s) of ${#ids[@]} container(s)"
}

case "${1:-}" in
  kill-container)
    [[ $# == 2 ]] || { echo "usage: $0 kill-container CONTAINER_ID" >&2; exit 2; }
    "${ctr[@]}" tasks kill -s SIGKILL "${2#containerd://}"
    log "SIGKILLed container ${2#containerd://}"
    ;;
  reboot)
    shift
    stop_kubelet
    kill_tasks "$@" 2>&1 | tail -1
    bash "$realk8s/restart-kubelet.sh" --timeout 120 2>&1 | tail -1
    ;;
  *)
    echo "usage: $0 kill-container CONTAINER_ID | reboot [NAMESPACE...]" >&2
    exit 2
    ;;
esac
