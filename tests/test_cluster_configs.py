"""The cluster files (launcher YAML, KubeRay manifests, runtime_env) and the README's stage commands:
well-formed, and every stage command accepted by that stage's own argument parser."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "cluster"
STAGES = ("train_teacher", "train_student", "evaluate", "cache_teacher", "sweep_students", "paper_table")


def parse_stage_command(command: str) -> tuple[str, list[str]]:
    """('cache_teacher', argv) of a 'python stages/cache_teacher.py ...' command line."""
    words = shlex.split(command.replace("\\\n", " "), comments=True)  # a shell drops `# ...`
    i = next(k for k, w in enumerate(words) if re.fullmatch(r"stages/\w+\.py", w))
    return Path(words[i]).stem, words[i + 1:]


def check_stage_command(command: str) -> str:
    stage, argv = parse_stage_command(command)
    assert stage in STAGES, stage
    parser = importlib.import_module(f"stages.{stage}").build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on unknown or missing flags
        raise AssertionError(f"{stage} rejects: {command}") from e
    return stage


def test_kuberay_manifests():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__, "the manifests name the Ray version the project pins"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"], \
        "the head listens on the pod network: token authentication, its token in a Secret"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["workerGroupSpecs"]
    assert workers and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in workers)
    gpu = workers[0]["template"]["spec"]["containers"][0]
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert head["image"] == gpu["image"]
    mounts = {m["mountPath"] for m in gpu["volumeMounts"]}
    assert {"/dev/shm", "/mnt/nuscenes"} <= mounts
    seen = set()
    for path in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")):
        job = yaml.safe_load(path.read_text())
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob", path
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"], path
        seen.add(check_stage_command(job["spec"]["entrypoint"]))
        assert "/mnt/nuscenes" in job["spec"]["entrypoint"]
    assert seen == {"cache_teacher", "train_student"}


def test_cluster_launcher_and_runtime_env():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    setup = " ".join(cfg["setup_commands"])
    assert "-c constraints.txt -e ." in setup and "torch==2.13.0" in setup, "the project installed on every node"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard is reached through `ray dashboard` only"
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start, "token authentication"
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"]), "the token reaches every node"
    assert any(t["min_workers"] >= 1 for t in cfg["available_node_types"].values())
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    ignored = {line.strip().strip("/") for line in (REPO / ".gitignore").read_text().splitlines() if line.strip()}
    for folder in (".venv", "demo_out", "runs", "outputs", "data"):
        assert folder in env["excludes"] and (folder in ignored or folder in (".git",)), folder
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


def readme_stage_commands() -> list[str]:
    """Every `python stages/X.py ...` command in the README's code blocks (continuations joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for cmd in re.split(r"(?<!\\)\n", block):
            if re.search(r"python stages/\w+\.py", cmd) and "..." not in cmd:
                commands.append(cmd)
    return commands


def test_readme_stage_commands_match_the_stages():
    commands = readme_stage_commands()
    stages = {check_stage_command(c) for c in commands}
    assert stages == set(STAGES), f"README shows commands for {sorted(stages)}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help_and_a_thin_main(stage):
    module = importlib.import_module(f"stages.{stage}")
    assert module.build_parser().format_help().count("--") >= 4
    lines = Path(module.__file__).read_text().splitlines()
    assert len(lines) < 110, f"stages/{stage}.py has {len(lines)} lines: a stage is parse, build, hand to Ray"
