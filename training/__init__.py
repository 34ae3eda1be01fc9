"""Layer 6: the training loop (loop.py) and the Task interface it drives (task.py)."""
