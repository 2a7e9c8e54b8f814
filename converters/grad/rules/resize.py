"""Gradient rules: resize ops."""
