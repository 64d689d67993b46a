"""Named qconfig presets combining the algorithms with any backend (``w4a4-lsq``, ...).

A preset sets bit widths, quantizers and observers; the backend keeps its signedness, symmetry and granularity
(see ``mq_core.QConfigPreset``). Backends refuse presets whose bit widths their runtime cannot execute (e.g.
TensorRT and 4 bits), in ``Backend.check``; the ``qdq`` backend simulates and exports 2-8 bits.

QAT presets (``mq.prepare(..., mode="qat")``, then train):

* ``w4a4-lsq`` / ``w2a4-lsq``: LSQ step sizes for weights and activations, LSQ's initialisation.
* ``w4a4-lsq-plus``: LSQ+ (learned offset on affine activation grids), LSQ+'s initialisation.
* ``w4a4-pact``: PACT activations (alpha starts at the top of the backend's activation observer range) with LSQ
  weights. The PACT paper pairs PACT with DoReFa weights (that is ``w4a4-dorefa-pact``); LSQ weights train faster
  from a pretrained float model and export directly. PACT clips at 0: it is for ReLU outputs.
* ``w4a4-dsq``: DSQ soft staircase for both, clipping bounds initialised by an MSE range search.
* ``w4a4-dorefa-pact``: the PACT paper's recipe. DoReFa weights need ``bake_dorefa(qmodel)`` before export.

PTQ presets (fixed quantizers, MSE range search) name the reconstruction method they are meant for
(``recommended_method``; run it with ``mq.ptq``).
"""

from mq_core import QConfigPreset


def _qat(name: str, description: str, weight_bits: int, weight: str, activation: str, weight_observer: str,
         activation_observer: str | None) -> QConfigPreset:
    return QConfigPreset(
        name, description, weight_bits=weight_bits, activation_bits=4, weight_fake_quantizer=weight,
        activation_fake_quantizer=activation, weight_observer=weight_observer,
        activation_observer=activation_observer,
    )


def _ptq(method: str, weight_bits: int, label: str) -> QConfigPreset:
    return QConfigPreset(
        f"w{weight_bits}a4-{method}",
        f"W{weight_bits}A4 fixed quantizers with MSE range search, for {label} reconstruction (mq.ptq).",
        weight_bits=weight_bits, activation_bits=4, weight_fake_quantizer="fixed", activation_fake_quantizer="fixed",
        weight_observer="mse", activation_observer="mse", recommended_method=method,
    )


PRESETS: list[QConfigPreset] = [
    _qat("w4a4-lsq", "W4A4 QAT with LSQ learned step sizes (Esser et al. 2020) and LSQ initialisation.", 4,
         "lsq", "lsq", "lsq", "lsq"),
    _qat("w2a4-lsq", "W2A4 QAT with LSQ learned step sizes (Esser et al. 2020) and LSQ initialisation.", 2,
         "lsq", "lsq", "lsq", "lsq"),
    _qat("w4a4-lsq-plus", "W4A4 QAT with LSQ+ learned step sizes and offsets (Bhalgat et al. 2020).", 4,
         "lsq_plus", "lsq_plus", "lsq_plus", "lsq_plus"),
    _qat("w4a4-pact", "W4A4 QAT: PACT learned activation clipping (Choi et al. 2018), LSQ weights.", 4,
         "lsq", "pact", "lsq", None),
    _qat("w4a4-dsq", "W4A4 QAT with DSQ soft quantization (Gong et al. 2019), MSE-initialised bounds.", 4,
         "dsq", "dsq", "mse", "mse"),
    _qat("w4a4-dorefa-pact", "W4A4 QAT: DoReFa weights (Zhou et al. 2016), PACT activations; bake before export.",
         4, "dorefa", "pact", "minmax", None),
    _ptq("adaround", 4, "AdaRound (Nagel et al. 2020)"),
    _ptq("brecq", 4, "BRECQ (Li et al. 2021)"),
    _ptq("qdrop", 4, "QDrop (Wei et al. 2022)"),
    _ptq("adaround", 2, "AdaRound (Nagel et al. 2020)"),
    _ptq("brecq", 2, "BRECQ (Li et al. 2021)"),
    _ptq("qdrop", 2, "QDrop (Wei et al. 2022)"),
]
