"""Gradient rules: conv ops."""
