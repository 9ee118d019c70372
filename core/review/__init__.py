"""The review loop: logged predictions looked at by a person, and what their verdicts feed.

A Review page lists logged predictions (core/inference/prediction_log.py) for an editor to give each
its true class or "cannot tell" (queue.py, store.py); field accuracy is a model's accuracy on those
verdicts (field.py); reviewed images become a new version of a dataset (to_data.py), on which the
model is trained again and compared with itself on its own test images (retrain.py).

After core/inference in the flow, at the top beside core/jobs: may import every stage, and
core/jobs/runs.py to queue a run; nothing below imports it. No torch, no streamlit.
"""
