"""Inference, the nuScenes results format, devkit scoring and pictures."""
