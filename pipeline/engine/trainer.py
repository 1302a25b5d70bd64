"""Driver side of a training run: check the inputs, lay out the run folder, hand the loop to Ray
Train's TorchTrainer, and export the final model.

A run folder (`--output RUN_DIR`, a local path or a URL) holds:

    config.yaml        the resolved config (a re-submitted run must match it, `runtime` aside)
    metrics.jsonl      one line per step: loss components, lr, grad norm, samples/s, data wait
    tensorboard/       the same scalars for TensorBoard
    epoch_NNNN/        Ray Train checkpoints (state.pt: model, optimiser, schedule, step), last 2 kept
    model.pt           the exported model (config + weights) that the other stages read

Ray Train's run name is the folder's name and its storage path the folder's parent, so re-running
the same command resumes from the last checkpoint (Train V2 restores a run by name and storage).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow.compute as pc
import yaml

from models.checkpoint import save_state_dict
from pipeline import storage
from pipeline.config import ConfigError, diff_keys
from pipeline.data import nusc_db
from pipeline.data.dataset import index_sweeps
from pipeline.data.index import build_index, share_index
from pipeline.engine.train_loop import read_checkpoint_state, train_loop_per_worker
from pipeline.ray_env import WORKER_ENV, ray_session

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
CHECKPOINTS_KEPT = 2


def check_pretrained_backbone(cfg: Mapping[str, Any]) -> None:
    """Refuse to train a camera or fusion detector from a random ResNet when its config asks for
    ImageNet weights (`train.require_pretrained_backbone`, on in the nuscenes camera and fusion
    presets: the paper's backbone starts from them). Raises ConfigError naming the keys to set."""
    if not cfg["train"].get("require_pretrained_backbone", False):
        return
    model = cfg["model"]
    if model["modality"] not in ("camera", "fusion") or model["camera_encoder"].get("pretrained") not in (None, ""):
        return
    depth = int(model["camera_encoder"].get("resnet_depth", 50))
    example = {50: "resnet50-0676ba61.pth", 18: "resnet18-f37072fd.pth"}.get(depth, f"resnet{depth}-....pth")
    raise ConfigError(
        f"model.camera_encoder.pretrained is not set: this {model['modality']} config starts its "
        f"ResNet-{depth} from torchvision's ImageNet weights, as the paper does. Set "
        f"--set model.camera_encoder.pretrained=PATH with PATH torchvision's ResNet-{depth} ImageNet "
        f"state-dict file ({example}), a local path or a URL (s3://, gs://, https://), or train the "
        "backbone from random init on purpose with --set train.require_pretrained_backbone=false")


def prepare_run_folder(output: str, cfg: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Write config.yaml into a new run folder, or check that an existing run was made the same way.

    `identity` (dataset, split, ...) is stored beside the config; a re-submitted run whose config
    or identity differ in anything but `runtime` is refused with the differing keys named.
    """
    doc = {"config": dict(cfg), "run": dict(identity)}
    path = storage.join(output, CONFIG_FILE)
    if storage.exists(path):
        old = yaml.safe_load(storage.read_bytes(path)) or {}
        differ = [k for k in diff_keys(old, doc) if not k.startswith("config.runtime")]
        if differ:
            raise ConfigError(f"run folder {output} already holds a run made with other settings "
                              f"(differing: {', '.join(differ)}); choose a new --output to start a new run")
    storage.write_bytes(path, yaml.safe_dump(doc, sort_keys=False).encode())


def export_model(checkpoint: Any, output: str, extra: Mapping[str, Any]) -> str:
    """Write RUN_DIR/model.pt from a Ray Train checkpoint (model weights and config only)."""
    with checkpoint.as_directory() as folder:
        state = read_checkpoint_state(folder)
    dest = storage.join(output, MODEL_FILE)
    info = {**dict(extra), "epoch": state["epoch"], "step": state["step"]}
    if storage.is_url(dest):
        with tempfile.TemporaryDirectory() as tmp:
            local = save_state_dict(Path(tmp) / MODEL_FILE, state["model"], state["config"], info)
            storage.upload(local, dest)
    else:
        save_state_dict(dest, state["model"], state["config"], info)
    return dest


def fit(cfg: Mapping[str, Any], dataroot: str | Path, version: str, split: str, output: str,
        build_task: Callable, identity: Mapping[str, Any] | None = None, address: str | None = None,
        extra_loop_config: Mapping[str, Any] | None = None) -> str:
    """Train with Ray Train and export the model; return the model file's path.

    Args:
        cfg: resolved config (sections grid, data, model, train, runtime).
        dataroot, version, split: the nuScenes training data.
        output: the run folder (local path or URL); see the module docstring.
        build_task: factory (loop_config, device) -> pipeline.engine.train_loop.TrainTask, run in each worker.
        identity: settings stored with the config that a resumed run must share (besides the data).
        address: Ray cluster address (None: RAY_ADDRESS, a running local cluster, or a new one).
        extra_loop_config: more keys for the loop config (read by `build_task`).
    """
    check_pretrained_backbone(cfg)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    nusc_db.check_dataroot(dataroot, version)
    nusc_db.check_split(version, split)
    root = str(Path(dataroot).expanduser().resolve())
    # Built (or found current) here, so that a bad dataset fails before Ray starts and the
    # workers only read the Parquet file.
    index = build_index(root, version, split, max_sweeps=index_sweeps(cfg))
    if not pc.sum(pc.list_value_length(index.column("gt_boxes"))).as_py():
        raise nusc_db.DatasetError(f"split {split} of {version} at {root} has no annotations (the test split's boxes "
                         f"are withheld): a detector trains on an annotated split (train, mini_train)")
    rt = cfg["runtime"]
    run_identity = {"dataroot": root, "version": version, "split": split, **dict(identity or {})}
    prepare_run_folder(output, cfg, run_identity)
    storage_path, name = storage.parent_and_name(output)
    local_logs = None if storage.is_url(output) else output
    loop_config = {"cfg": dict(cfg), "dataroot": root, "version": version, "split": split,
                   "log_dir": local_logs, "log_url": output if storage.is_url(output) else None,
                   "build_task": build_task, **dict(extra_loop_config or {})}
    use_gpu = bool(rt["use_gpu"])
    resources = {"CPU": float(rt["cpus_per_worker"])}
    if use_gpu:
        resources["GPU"] = 1.0
    with ray_session(address):
        # Workers read the index from the object store: they never open the devkit (tens of them
        # at ~30 s and GBs each on v1.0-trainval) nor need this machine's index file.
        loop_config["index"] = share_index(index)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=int(rt["num_workers"]), use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=int(rt["max_failures"])),
                                 checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                                 worker_runtime_env={"env_vars": dict(WORKER_ENV)}),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {output} finished without a checkpoint")
    path = export_model(result.checkpoint, output, {"run": run_identity, "metrics": dict(result.metrics or {})})
    print(f"[train] exported {path}", flush=True)
    return path
