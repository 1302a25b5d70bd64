"""Batch inference with Ray Data: a split's samples -> detections in nuScenes results form.

    batches of dataset positions --map_batches(Predictor, ActorPoolStrategy)--> rows {token, results_json}

The work items are fixed batches of dataset positions, so a sample is always run in the same
batch whatever Ray Data's block bundling does (batched convolutions round differently for
different batch compositions; fixed batches make a repeated evaluation bit-identical). Each actor holds the model (loaded once, eval mode, GPU when
it has one) and the split's Dataset, loads its batch's samples with a few threads (decoding
releases the GIL), runs the detector and returns one compact row per sample: the sample token
and its nuScenes sample_results as a JSON string. Only these small rows cross the object store.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.data.collate import collate
from pipeline.data.dataset import DetectionDataset
from pipeline.engine.train_loop import to_device
from pipeline.evaluation.results import lidar_boxes_to_results
from pipeline.model_files import load_detector


def eval_dataset(cfg: Mapping[str, Any], dataroot: str | Path, version: str, split: str,
                 modality: str, index: Any = None) -> DetectionDataset:
    """The un-augmented samples of a split as a detector of `modality` needs them (`index`: the
    split's index shared by the driver, see DetectionDataset)."""
    return DetectionDataset(dataroot, version, split, cfg, train=False, with_images=modality != "lidar", index=index)


class Predictor:
    """Ray Data callable class: dataset positions -> per-sample results rows.

    Args:
        model_path: a model file (RUN_DIR/model.pt).
        dataroot, version, split: the data to run on.
        load_threads: threads loading a batch's samples.
        index: the split's index shared by the driver (pipeline.data.index.share_index).
    """

    def __init__(self, model_path: str, dataroot: str, version: str, split: str, load_threads: int = 2,
                 index: Any = None) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.cfg = load_detector(model_path, device=device)
        self.model.eval()
        self.device = torch.device(device)
        self.dataset = eval_dataset(self.cfg, dataroot, version, split, self.model.modality, index)
        self.pool = ThreadPoolExecutor(max_workers=max(1, load_threads))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [int(i) for group in batch["items"] for i in group]
        samples = list(self.pool.map(self.dataset.get, items))
        with torch.no_grad():
            dets = self.model.predict(to_device(collate(samples), self.device))
        tokens, docs = [], []
        for item, det in zip(items, dets):
            row = self.dataset.row(item)
            results = lidar_boxes_to_results(row, det["boxes"].cpu().numpy(), det["scores"].cpu().numpy(),
                                             det["labels"].cpu().numpy())
            tokens.append(row["token"])
            docs.append(json.dumps(results))
        return {"token": np.asarray(tokens, dtype=object), "results_json": np.asarray(docs, dtype=object)}


def predict_split(model_path: str | Path, dataroot: str | Path, version: str, split: str, num_samples: int,
                  actors: int = 1, batch_size: int = 4, cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, index: Any = None) -> dict[str, list[dict]]:
    """Run the model over every sample of the split with Ray Data; return {token: sample_results}.

    `index`: the split's index shared by the driver (pipeline.data.index.share_index); the actors read
    their rows from it instead of opening the devkit.
    """
    import ray.data

    groups = [{"items": list(range(i, min(i + batch_size, num_samples)))} for i in range(0, num_samples, batch_size)]
    ds = ray.data.from_items(groups, override_num_blocks=max(1, min(len(groups), 4 * actors)))
    preds = ds.map_batches(
        Predictor, fn_constructor_kwargs={"model_path": str(model_path), "dataroot": str(dataroot),
                                          "version": version, "split": split, "index": index},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, batch_format="numpy")
    results: dict[str, list[dict]] = {}
    for row in preds.iter_rows():
        results[str(row["token"])] = json.loads(row["results_json"])
    if len(results) != num_samples:
        raise RuntimeError(f"inference returned {len(results)} samples, expected {num_samples}")
    return results
