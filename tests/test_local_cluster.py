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
        # Both accept a job right away: each node's job agent listens on a port of its own (with Ray's
        # fixed default the second cluster's agent had no HTTP server and refused every submission).
        for env in envs:
            submitted = subprocess.run(["ray", "job", "submit", "--no-wait", "--address",
                                        f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}", "--", "python", "-c", "pass"],
                                       env=env, capture_output=True, text=True, timeout=120)
            assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
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


def test_another_drivers_in_process_cluster_is_not_joined():
    """A stage started while another process runs its own in-process cluster (ray.init() without an
    address) starts its own instead of joining that one, which would die with its driver and take the
    stage's actors and objects with it (seen: two experiments run side by side, one lost its
    evaluation when the other finished). Clusters of `ray start` (local_cluster.sh) are still joined."""
    import os
    import time

    from pipeline.ray_env import (_gcs_address, _running_local_cluster, _started_by_ray_start,
                                  ray_start_gcs_processes)

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("import pipeline.ray_env as e, ray, time; e.loopback_environment(); "
            "ray.init(num_cpus=1, include_dashboard=False); print('up', flush=True); time.sleep(300)")
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    script, port = str(REPO / "cluster" / "local_cluster.sh"), free_port()
    try:
        assert driver.stdout.readline().strip() == "up"
        import ray  # noqa: F401  (puts Ray's packaged psutil on sys.path)
        import psutil

        deadline = time.time() + 30
        gcs = []
        while not gcs and time.time() < deadline:
            gcs = [c for c in psutil.Process(driver.pid).children(recursive=True) if c.name().startswith("gcs_server")]
            time.sleep(0.5)
        assert gcs, "the in-process cluster runs a GCS server under its driver"
        assert not _started_by_ray_start(gcs[0])
        assert gcs[0].pid not in [p.pid for p in ray_start_gcs_processes()]

        started = subprocess.run([script, "start", "--cpus", "1"], env=cluster_env(port), capture_output=True,
                                 text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        ours = [int(line.split()[0]) for line in processes_of(port) if "gcs_server" in line]
        assert ours and set(ours) <= {p.pid for p in ray_start_gcs_processes()}
        # (other `ray start` clusters, e.g. the test session's, may run too: any of them may be joined)
        assert f"127.0.0.1:{port}" in {_gcs_address(p) for p in ray_start_gcs_processes()}
        assert _running_local_cluster() not in (None, _gcs_address(gcs[0]))
    finally:
        driver.kill()
        driver.wait(timeout=60)
        subprocess.run([script, "stop"], env=cluster_env(port), capture_output=True, timeout=120)
