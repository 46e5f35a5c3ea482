"""Every layer of RetinaMask as a ``*_forward`` / ``*_backward`` pair.

``*_forward(...)`` returns ``(out, cache)``; ``*_backward(dout, cache)``
returns the gradients in the order the docstring lists. Arrays are NCHW.
Each function runs on the current backend (see ``minimask.backend``): the
forward takes the current backend object, runs the implementation its
module registered there, and keeps the backend in the cache, so the backward
runs on the same backend whatever the setting is by then.

One module per layer, each holding the equation, the NumPy reference, the
Numba CPU kernel and the CUDA kernel:

============================  ===========================================
module                        functions
============================  ===========================================
``activations``               relu, sigmoid
``conv``                      conv2d, conv_transpose2d (im2col + GEMM)
``gemm``                      the tiled CUDA GEMM the convolutions use
``group_norm``                group_norm
``frozen_bn``                 frozen_bn (batch norm with fixed statistics)
``pooling``                   max_pool2d
``upsample``                  upsample_nearest2d
``roi_align``                 roi_align (avg and max)
``focal_loss``                sigmoid_focal_loss
``smooth_l1``                 smooth_l1
``mask_bce``                  mask_bce
``glue``                      the model's glue between layers (adds, crops,
                              head flattening, row gathers, SGD, ...)
============================  ===========================================

Submodules are imported on first use (PEP 562), so ``import minimask``
stays quick and a layer's kernels load only when it is called.
"""
import importlib

_MODULE_OF = {}
for _module, _layers in {
    "activations": ["relu", "sigmoid"],
    "conv": ["conv2d", "conv_transpose2d"],
    "group_norm": ["group_norm"],
    "frozen_bn": ["frozen_bn"],
    "pooling": ["max_pool2d"],
    "upsample": ["upsample_nearest2d"],
    "roi_align": ["roi_align"],
    "focal_loss": ["sigmoid_focal_loss"],
    "smooth_l1": ["smooth_l1"],
    "mask_bce": ["mask_bce"],
}.items():
    for _layer in _layers:
        _MODULE_OF[f"{_layer}_forward"] = _module
        _MODULE_OF[f"{_layer}_backward"] = _module

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'minimask.layers' has no attribute {name!r}")
    module = importlib.import_module(f"minimask.layers.{_MODULE_OF[name]}")
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
