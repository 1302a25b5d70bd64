"""Connecting the stages to Ray: an existing cluster when there is one, else a local one on loopback.

Order of preference (DESIGN §4):
1. an explicit `--address` (or `RAY_ADDRESS`, which `ray job submit` sets for its entrypoint);
2. a cluster already running on this machine (`cluster/local_cluster.sh start`, or any `ray start`),
   never another process's in-process cluster (it would die with that process);
3. a new single-node cluster inside this process, bound to 127.0.0.1 only (DESIGN §5), which is
   stopped again when the stage ends. `--address local` (or RAY_ADDRESS=local) skips step 2:
   a job that must not share, e.g. beside a test suite's cluster whose token it does not hold.

Every cluster the project starts uses Ray's token authentication (RAY_AUTH_MODE=token): whoever can
reach a dashboard or GCS port without the token can run nothing. The token is this user's Ray
token file (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, where Ray's CLI looks too), generated on
first use and readable by the user only (`ensure_auth_token`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from models.errors import UserError

LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 1 << 30  # 1 GiB is plenty for the compact rows the stages move

# Set before Ray is imported anywhere in the process, so that every Ray component started from
# here stays on loopback and phones nowhere.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_NODE_IP_ADDRESS": LOOPBACK,
    # Token authentication for every cluster started here and every client (Ray's CLI needs it
    # set explicitly: without it `ray status` and `ray job submit` send no token).
    "RAY_AUTH_MODE": "token",
    # Ray Train's print patch echoes every worker line twice on the driver.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Environment of Ray Train workers on any cluster (a connected cluster did not inherit ours).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Object-store settings a driver passes on to the workers of its job when they are set: workers
# must reach the caches and runs the driver names (e.g. an S3-compatible endpoint).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")


def job_runtime_env(address: str | None = None) -> dict:
    """runtime_env of this driver's job: the FORWARDED_ENV variables that are set here, and
    RAY_ADDRESS when `address` names a cluster's GCS ('host:port').

    RAY_ADDRESS lets Ray's own helper actors (Ray Train's placement-group cleaner and run-state
    actor query the State API without an address) find their cluster when several run on one
    machine, as in the tests; without it they die with "Found multiple active Ray instances".
    Empty under `ray job submit`, whose job already carries its runtime_env (pass variables with
    --runtime-env-json there).
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if address and "://" not in address and address != "auto":
        env["RAY_ADDRESS"] = address
    return {"env_vars": env} if env else {}


def auth_token_file() -> Path:
    """The file Ray reads this user's auth token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def has_auth_token() -> bool:
    """Whether a token is set (RAY_AUTH_TOKEN) or stored (`auth_token_file`)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    try:
        return auth_token_file().stat().st_size > 0
    except OSError:
        return False


def ensure_auth_token() -> Path | None:
    """Make sure Ray finds a token: generate one into `auth_token_file` (mode 0600) if there is none.

    Returns the token file (None when the token comes from RAY_AUTH_TOKEN). A token file that group
    or others can read is made private, with a note: the token lets its holder run code on the cluster.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = auth_token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # kept (another process may have just written it)
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            print(f"[ray] made the Ray auth token {path} readable by its owner only", flush=True)
        if path.stat().st_size == 0:
            raise UserError(f"the Ray auth token file {path} is empty: delete it to have a new token "
                             f"generated, or point RAY_AUTH_TOKEN_PATH at the cluster's token") from None
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate` makes them
    print(f"[ray] generated a Ray auth token in {path} (clients of this cluster need it and "
          f"RAY_AUTH_MODE=token)", flush=True)
    return path


def loopback_environment() -> None:
    """Apply RAY_ENV_DEFAULTS to os.environ (values already set by the user win).

    Must run before `import ray`: Ray reads the node address once, at import. When RAY_ADDRESS
    names a cluster to join (as under `ray job submit`), the node address is left to Ray, since
    that cluster's nodes need not be on loopback; token mode is then set only where this user has
    a token (a token-mode client also talks to a cluster without authentication; one without a
    token could not connect at all).
    """
    joining = bool(os.environ.get("RAY_ADDRESS"))
    for key, value in RAY_ENV_DEFAULTS.items():
        if joining and (key == "RAY_NODE_IP_ADDRESS" or (key == "RAY_AUTH_MODE" and not has_auth_token())):
            continue
        os.environ.setdefault(key, value)


def _started_by_ray_start(gcs: Any) -> bool:
    """Whether a GCS process belongs to a cluster started with `ray start`, not to another driver's
    in-process cluster (`ray.init()` without an address), which dies with that driver.

    `ray start` leaves its GCS orphaned (or parented by `ray start --block`); an in-process
    cluster's GCS is the child of the Python process that called `ray.init()`.
    """
    import ray  # noqa: F401  (puts Ray's packaged psutil on sys.path)
    import psutil

    try:
        parent = gcs.parent()
        if parent is None or parent.pid == 1:
            return True
        command = " ".join(parent.cmdline())
        return "ray start" in command or not parent.name().lower().startswith("python")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def ray_start_gcs_processes() -> list[Any]:
    """The GCS processes on this machine of clusters started with `ray start`."""
    import ray  # noqa: F401  (puts Ray's packaged psutil on sys.path)
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "status"]):
        if ((proc.info["name"] or "").startswith("gcs_server") and proc.info["status"] != psutil.STATUS_ZOMBIE
                and _started_by_ray_start(proc)):
            found.append(proc)
    return found


def _gcs_address(gcs: Any) -> str | None:
    """'ip:port' of a GCS process, from the flags Ray starts it with; None if it has exited meanwhile."""
    import psutil  # Ray's packaged copy: the caller found `gcs` through it

    try:
        cmdline = gcs.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    flags = dict(arg.lstrip("-").split("=", 1) for arg in cmdline if arg.startswith("--") and "=" in arg)
    ip, port = flags.get("node-ip-address"), flags.get("gcs_server_port")
    return f"{ip}:{port}" if ip and port else None


def _running_local_cluster() -> str | None:
    """The address of a Ray cluster started with `ray start` on this machine, if one is running.

    Another process's in-process cluster does not count: joining it (what Ray's own address
    discovery, address='auto', would do) ties this job to that process's lifetime; it loses its
    actors and objects when that process exits.
    """
    for gcs in ray_start_gcs_processes():
        address = _gcs_address(gcs)
        if address:
            return address
    return None


def init_ray(address: str | None = None, num_cpus: int | None = None, log: bool = True) -> bool:
    """Connect to Ray as described in the module docstring; return True if a local cluster was started.

    Args:
        address: a Ray address ('auto', '127.0.0.1:6379', 'ray://...'); None follows RAY_ADDRESS
            or a running local cluster, else starts one; 'local' always starts one.
        num_cpus: CPUs of a cluster started here (default: all of this machine's).
    """
    loopback_environment()
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        ensure_auth_token()  # before Ray would write one readable by everyone (umask 022)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        address = _running_local_cluster()
    elif address == "local":  # a cluster of this process's own, whatever else runs on the machine
        address = None
        os.environ.pop("RAY_ADDRESS", None)  # Ray would read it again below, and its workers after it
    if address is not None:
        ray.init(address=address, log_to_driver=log, runtime_env=job_runtime_env(address) or None)
        return False
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's controller polls.
    ray.init(num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=True,
             dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, log_to_driver=log)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """`init_ray` for the duration of a block; shuts down what it connected to or started."""
    import ray

    already = ray.is_initialized()
    init_ray(address, num_cpus)
    try:
        yield
    finally:
        if not already:
            ray.shutdown()
