"""Pure image functions: Augmentor operations at exact probabilities, stain normalisation and jitter, tiles,
and the two pipelines built from them (evaluation, training). They take and return arrays or PIL images and
read no records; imports only core.errors."""
