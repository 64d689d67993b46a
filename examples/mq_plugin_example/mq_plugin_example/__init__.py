"""mq-plugin-example: a complete third-party mq plugin, the ``pot-npu`` fixed-point NPU target.

What a plugin author writes, one file per idea (read them in this order):

* ``backend.py``: the target's quantization rules as data (a ``mq_core.Backend``): the integer grids of weights
  and activations, where activation quantizers go, which bit widths the hardware runs, which exporters and
  runtimes serve it. The core's ``prepare`` reads it; the plugin writes no graph code.
* ``fixpos.py``: the target's file format (here, a JSON of fix positions): writing, and reading back. Reading
  matters as much as writing: verification parses the file *as written*, so a formatting bug cannot hide.
* ``exporter.py``: turns the core's canonical export (a QDQ ONNX and its ranges table) into the files the
  target's toolchain consumes. It derives from ``RangesFileExporter`` (float ONNX + a side file of ranges) and
  writes only the format: the base writes, reads back and verifies the files.
* ``plugin.py``: the entry point (group ``mq`` in ``pyproject.toml``) that registers the above through hooks.

Nothing here copies core code, and everything it uses comes from ``mq_core`` or ``mq_core.plugin_api`` (the public
plugin API): the grid math is ``QuantScheme``'s, the ONNX work is ``RangesFileExporter``'s (Q/DQ stripped, table
propagated across pass-through ops, the file read back and Q/DQ rebuilt from it for verification).
"""

__version__ = "0.1.0"
