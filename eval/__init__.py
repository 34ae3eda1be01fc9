"""Layer 5: FID and friends, reconstruction metrics, reference batches, and the evaluator
registry the training loop runs (evaluators.py)."""
