"""The FGSM/PGD family on onnxruntime, sharing one gradient loop."""
