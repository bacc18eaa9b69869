"""Measures computed from captured activations and model outputs.

Each measure lives in its own module (``decodability``, ...) and works on plain arrays or tensors, so it
can be used on a run folder's activations or on any [n_layers, n, d] stack.
"""
