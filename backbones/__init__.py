"""Frozen pretrained feature networks shared by the rest of the suite."""
