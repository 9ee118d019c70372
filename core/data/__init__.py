"""Files to training-ready records: ingest (folder, zip, upload), decode and cache, groups, splits, leak audit,
a run's data through its pipelines (prepare).
Imports core.store, core.access and core.transforms (pure array functions); never training or later."""
