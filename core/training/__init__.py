"""The run config, the modified DenseNet-201, the training loop, several-GPU training, augmentation presets.
Imports core.store, core.access, core.data and core.transforms; never evaluation, inference or jobs."""
