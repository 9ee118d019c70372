"""Metrics and the paper's Table I, calibration and the refer band, the colour-only yardstick.
Imports core.store, core.data and core.training; never inference or jobs."""
