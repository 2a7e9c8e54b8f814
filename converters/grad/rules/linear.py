"""Gradient rules: linear ops."""
