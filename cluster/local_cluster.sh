#!/usr/bin/env bash
# A Ray cluster on this machine, bound to 127.0.0.1 only (DESIGN §5).
#
#   cluster/local_cluster.sh start [--cpus N] [--workers K] [--worker-cpus M]
#       head node with N CPUs (default: all), plus K extra worker nodes of M CPUs each on the
#       same machine (to rehearse multi-node runs); prints the status and the dashboard URL.
#   cluster/local_cluster.sh add-worker [--worker-cpus M]   one more worker node
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop        stops this cluster's processes only (other Ray clusters on
#                                        the machine, e.g. another checkout's tests, keep running)
#
# Stages find the running cluster by themselves; jobs go to it with
#   export RAY_AUTH_MODE=token
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python stages/X.py ...
# The cluster uses Ray's token authentication (RAY_AUTH_MODE, default token): the token is
# ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH), generated at the first start, readable by the user only.
# Ports: RAY_PORT (GCS, default 6379), RAY_DASHBOARD_PORT (default 8265), RAY_CLIENT_PORT (RAY_PORT + 1),
# RAY_DASHBOARD_AGENT_PORT (each node's job agent; default 0, a free port: with Ray's fixed 52365 a
# second cluster on the machine, or an in-process one, leaves this one's agent without its HTTP
# server, and every `ray job submit` to it fails with "No available agent to submit job").
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
# Jobs run `python` from the PATH of the node that runs them: put the project's venv first.
if [ -x "$here/.venv/bin/ray" ]; then
    export PATH="$here/.venv/bin:$PATH"
fi
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray treat this as a single-machine install (loopback
# addresses everywhere); extra worker nodes join through cluster/join_local_node.py.
export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_NODE_IP_ADDRESS=127.0.0.1
# Token authentication: without the token no client can submit a job, call the dashboard's API or
# join the GCS (other users of this machine included).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_TRAIN_ENABLE_PRINT_PATCH=0
ip=127.0.0.1
port="${RAY_PORT:-6379}"
dash="${RAY_DASHBOARD_PORT:-8265}"
agent_port="${RAY_DASHBOARD_AGENT_PORT:-0}"
object_store=$((1024 * 1024 * 1024))
# One temp dir per cluster, so `stop` can find exactly this cluster's processes.
tmp="${RAY_LOCAL_TMPDIR:-/tmp/ray_local_$port}"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

add_worker() {  # through join_local_node.py: plain `ray start --address` would leave loopback
    local cpus="$1"
    python "$here/cluster/join_local_node.py" --address "$ip:$port" --node-ip-address "$ip" --num-cpus "$cpus" \
        --object-store-memory "$object_store" --disable-usage-stats --dashboard-agent-listen-port "$agent_port" >/dev/null
}

cluster_pids() {  # this cluster's processes (naming its session or address) and their descendants
    local session frontier all next p
    session="$(basename "$(readlink -f "$tmp/session_latest" 2>/dev/null)" 2>/dev/null)" || true
    case "$session" in session_*) ;; *) session="" ;; esac
    frontier="$( { [ -z "$session" ] || pgrep -f -- "$session"; pgrep -f -- "$ip:$port( |$)"; } | sort -u || true)"
    all="$frontier"
    while [ -n "$frontier" ]; do
        next=""
        for p in $frontier; do next="$next $(pgrep -P "$p" || true)"; done
        frontier="$(echo $next)"
        all="$all $frontier"
    done
    for p in $all; do [ "$p" = "$$" ] || echo "$p"; done | sort -u
}

stop_cluster() {
    local pids
    pids="$(cluster_pids)"
    [ -n "$pids" ] || { echo "no cluster running at $ip:$port"; return 0; }
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
        # (if/then, not `kill -0 && echo`: under set -e a dead last pid would end the script here,
        # before the KILL below, leaving a GCS server that ignores TERM running)
        pids="$(for p in $pids; do if kill -0 "$p" 2>/dev/null; then echo "$p"; fi; done)"
        [ -n "$pids" ] || break
        sleep 0.5
    done
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    echo "stopped the Ray cluster at $ip:$port"
}

status() {
    local out=""
    for _ in $(seq 1 60); do  # the autoscaler reports a few seconds after start
        out="$(ray status --address "$ip:$port" 2>&1)" || true
        case "$out" in *"Resources"*) break ;; esac
        sleep 0.5
    done
    echo "$out"
    echo "dashboard: http://$ip:$dash   (ray job submit --address http://$ip:$dash ...)"
    if [ "$RAY_AUTH_MODE" = token ]; then
        echo "auth: token in ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}; clients need: export RAY_AUTH_MODE=token"
    fi
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
cpus="" workers=0 worker_cpus=1
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) cpus="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --worker-cpus) worker_cpus="$2"; shift 2 ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done

case "$cmd" in
    start)
        [ "$RAY_AUTH_MODE" != token ] || python "$here/cluster/auth_token.py" >/dev/null
        args=(--head --node-ip-address "$ip" --port "$port" --dashboard-host "$ip" --dashboard-port "$dash"
              --object-store-memory "$object_store" --disable-usage-stats --temp-dir "$tmp"
              --ray-client-server-port "${RAY_CLIENT_PORT:-$((port + 1))}" --dashboard-agent-listen-port "$agent_port")
        [ -n "$cpus" ] && args+=(--num-cpus "$cpus")
        ray start "${args[@]}" >/dev/null
        for _ in $(seq 1 "$workers"); do add_worker "$worker_cpus"; done
        # `ray start` returns before the head's job agent registers; the dashboard waits only 10 s for
        # one, so on a loaded machine the first `ray job submit` would fail. Return ready for jobs.
        python "$here/cluster/wait_job_agent.py" --address "$ip:$port" || true
        status
        ;;
    add-worker) add_worker "$worker_cpus"; status ;;
    status) status ;;
    stop) stop_cluster ;;
    *) usage ;;
esac
