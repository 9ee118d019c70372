"""A trained model in use: the predictor and Grad-CAM heat maps.
Imports the stages before it (store, data, transforms, training, evaluation); never jobs."""
