"""Every layer of RetinaMask as a ``*_forward`` / ``*_backward`` pair.

``*_forward(...)`` returns ``(out, cache)``; ``*_backward(dout, cache)``
returns the gradients in the order the docstring lists. Arrays are NCHW.
Each function runs on the current backend (see ``minimask.backend``).
"""
from minimask.layers.activations import relu_backward, relu_forward, sigmoid_backward, sigmoid_forward

__all__ = [
    "relu_forward", "relu_backward", "sigmoid_forward", "sigmoid_backward",
]
