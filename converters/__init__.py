"""Source frameworks to ONNX, and the gradient-graph builder. Heavy dependencies live only here."""
