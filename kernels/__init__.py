"""Triton kernels of fused_tau (installed as ``fused_tau.kernels``).

``row``: the row engine (softmax, log_softmax, logsumexp, cross_entropy).
``tl_math``: jit math shared by the kernels.
"""
