"""cluster/local_cluster.sh: stop leaves none of its cluster's processes behind, and only its own."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_a_cluster_of_the_script_refuses_clients_without_its_token(ray_cluster):
    """Token authentication: the dashboard's job API and `ray job submit` refuse a caller without the
    token (or with a wrong one) and accept the token holder."""
    import json
    import os
    import urllib.error
    import urllib.request

    from pipeline.ray_env import auth_token_file

    token = auth_token_file().read_text().strip()
    assert len(token) == 64 and oct(auth_token_file().stat().st_mode & 0o777) == "0o600"
    url = f"{ray_cluster['dashboard']}/api/jobs/"

    def status_of(headers: dict) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                json.load(r)
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status_of({}) == 401
    assert status_of({"Authorization": "Bearer " + "0" * 64}) == 403
    assert status_of({"Authorization": f"Bearer {token}"}) == 200

    def submit(**env: str) -> subprocess.CompletedProcess:
        run_env = dict(ray_cluster["env"], **env)
        return subprocess.run(["ray", "job", "submit", "--no-wait", "--address", ray_cluster["dashboard"], "--",
                               "python", "-c", "pass"], env=run_env, capture_output=True, text=True, timeout=120)

    without = submit(RAY_AUTH_MODE="disabled")  # a client that sends no token
    assert without.returncode != 0 and "uthentication" in without.stdout + without.stderr
    wrong = submit(RAY_AUTH_TOKEN="f" * 64)
    assert wrong.returncode != 0, wrong.stdout[-2000:]
    accepted = submit()
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert os.environ["RAY_AUTH_MODE"] == "token"



def test_address_local_starts_a_cluster_of_its_own_beside_a_running_one(ray_cluster, tmp_path):
    """RAY_ADDRESS=local (or --address local): a job that holds another token than the running
    `ray start` cluster (here the test session's) starts its own instead of failing to join it."""
    from pipeline.ray_env import _running_local_cluster

    assert _running_local_cluster() is not None, "the session's cluster is running"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS="local", RAY_AUTH_TOKEN_PATH=str(tmp_path / "other_token"))
    code = ("import pipeline.ray_env as e, ray, os; started = e.init_ray(num_cpus=1, log=False); "
            "print(started, ray.get(ray.remote(lambda: 6 * 7).remote()), os.environ.get('RAY_ADDRESS'), "
            "ray.get_runtime_context().gcs_address, flush=True); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    started, answer, left, gcs = done.stdout.strip().splitlines()[-1].split()
    assert (started, answer, left) == ("True", "42", "None")
    assert gcs != ray_cluster["address"] and gcs.startswith("127.0.0.1:")

def test_the_auth_token_is_generated_once_and_private(tmp_path, monkeypatch, capsys):
    import os
    import stat

    from pipeline.ray_env import ensure_auth_token

    path = tmp_path / "ray" / "auth_token"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert ensure_auth_token() == path
    token = path.read_text()
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "generated a Ray auth token" in capsys.readouterr().out
    assert ensure_auth_token() == path and path.read_text() == token, "an existing token is kept"
    os.chmod(path, 0o644)  # e.g. written by `ray get-auth-token --generate` under umask 022
    ensure_auth_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token
    path.write_text("")
    with pytest.raises(ValueError, match=f"Ray auth token file {path} is empty"):
        ensure_auth_token()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    assert ensure_auth_token() is None, "a token in the environment needs no file"
