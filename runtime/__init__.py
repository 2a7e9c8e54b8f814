"""Attacks, face pipeline, sessions and metrics: numpy + onnxruntime + pillow only."""
