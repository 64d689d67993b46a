"""The pipeline, one module per step, in the order a model goes through them.

1-4. ``prepare``: capture (``mq_core.graph.capture``) -> fuse (``graph.fusion`` with ``graph.patterns``) -> QAT swap
     (``graph.qat_swap``) -> place quantizers (``graph.placement``), for a backend's policy;
5.   ``calibrate``: observers see data, qparams freeze;
6.   ``ptq``: optional post-training methods (AdaRound, BRECQ, ... from plugins);
7.   ``export``: the canonical QDQ ONNX and the exporter's artifacts, swapped into place whole;
8.   ``verify``: artifacts run in real runtimes, compared with the simulation;
     ``workflow``: all of them for ``mq quantize``.

Nothing is imported here, so importing one step does not import the others.
"""
