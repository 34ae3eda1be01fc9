"""tfds builders and grain pipelines."""
