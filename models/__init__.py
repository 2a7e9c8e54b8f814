"""Shipped attack graphs and their manifest (package data)."""
