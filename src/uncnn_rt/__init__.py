"""uncnn-rt: a portable adversarial-perturbation runtime on onnxruntime.

Subpackages: ``uncnn_rt.runtime`` (attacks, face pipeline, sessions; numpy + onnxruntime + pillow only),
``uncnn_rt.converters`` (sources to ONNX and the gradient-graph builder; heavy extras),
``uncnn_rt.cli`` (the ``uncnn-rt`` command), ``uncnn_rt.serve`` (the HTTP service of ``uncnn-rt serve``)
and ``uncnn_rt.models`` (shipped attack graphs + manifest).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("uncnn-rt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
