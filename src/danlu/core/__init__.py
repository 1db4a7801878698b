"""What every algorithm shares: the optimizer shell and its checks (``shell``), accumulation
windows (``window``), precision and stochastic rounding (``precision``), gradient saturation
(``overflow``), non-finite handling (``nonfinite``), tensor grouping (``tensors``), DTensor
primitives (``dtensor``), the CPU chunked and compiled drivers (``chunked``, ``compiled``) and
the Triton launch tables (``triton``). Nothing here imports anything else from danlu.
"""
