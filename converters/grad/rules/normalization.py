"""Gradient rules: normalization ops."""
