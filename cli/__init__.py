"""The ``uncnn-rt`` command line."""
