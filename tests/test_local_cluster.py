"""cluster/local_cluster.sh: stop leaves none of its cluster's processes behind, and only its own."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, cluster_env, free_port


def processes_of(port: int) -> list[str]:
    """Command lines of live processes that belong to the cluster whose temp dir is /tmp/ray_local_<port>."""
    out = subprocess.run(["pgrep", "-af", f"ray_local_{port}/"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_stop_leaves_no_process_of_the_cluster_and_spares_other_clusters():
    script = str(REPO / "cluster" / "local_cluster.sh")
    ports = free_port(), free_port()
    envs = [cluster_env(p) for p in ports]
    try:
        for env in envs:
            started = subprocess.run([script, "start", "--cpus", "1"], env=env, capture_output=True, text=True,
                                     timeout=180)
            assert started.returncode == 0, started.stdout + started.stderr
        # A driver that runs a task, so the cluster has worker processes too.
        code = "import pipeline, ray; ray.init(address='127.0.0.1:%d'); print(ray.get(ray.remote(lambda: 7).remote()))"
        ran = subprocess.run([sys.executable, "-c", code % ports[0]], env=envs[0], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        assert ran.stdout.strip().endswith("7"), ran.stderr[-2000:]
        assert any("gcs_server" in p for p in processes_of(ports[0]))

        stopped = subprocess.run([script, "stop"], env=envs[0], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "stopped the Ray cluster" in stopped.stdout
        assert processes_of(ports[0]) == [], "every process of the stopped cluster is gone (GCS server included)"
        assert any("gcs_server" in p for p in processes_of(ports[1])), "the other cluster keeps running"
    finally:
        for env in envs:
            subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
