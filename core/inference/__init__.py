"""A trained model in use: the model file, the predictor built from it alone, Grad-CAM heat maps, and
the probabilities as displayed (calibrated or raw, labelled).
Imports the stages before it (store, data, transforms, training, evaluation); never jobs."""
