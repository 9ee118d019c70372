"""Running the flow in the background: the queue, the worker, a run from records to results, the paper reproduction.
The top of the flow: may import every other package. views/ gives the pages their records (no torch)."""
