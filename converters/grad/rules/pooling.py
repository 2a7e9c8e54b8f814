"""Gradient rules: pooling ops."""
