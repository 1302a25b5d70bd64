"""Reading nuScenes: the devkit-built index, sample loading, augmentation and batching."""
