"""The first-party backends, grouped by how they place quantizers, for parametrizing tests over them.

A third-party plugin's tests can run the same checks over the first-party backends and its own::

    import pytest
    from mq_core.testing.backends import ALL_BACKENDS, backend_or_skip

    @pytest.mark.parametrize("name", (*ALL_BACKENDS, "my-backend"))
    def test_prepares(name):
        backend = backend_or_skip(name)
        ...

``backend_or_skip`` skips rather than fails when a backend's plugin distribution is not installed, so the same
test file runs wherever only some plugins are.
"""

from __future__ import annotations

from mq_core.backend import Backend
from mq_core.errors import UnknownNameError
from mq_core.plugins.lookup import get_backend

#: Every backend mq ships: the first-party plugins plus the core's qdq.
ALL_BACKENDS = ("qdq", "tensorrt", "openvino", "snpe", "tvm", "tengine")
#: Backends with total-integer (output) placement: every op's output is quantized.
OUTPUT_BACKENDS = ("qdq", "snpe", "tvm", "tengine")
#: Backends with input placement: quantizers sit on the inputs of the ops that run in integer.
INPUT_BACKENDS = ("tensorrt", "openvino")


def backend_or_skip(name: str) -> Backend:
    """The backend registered under ``name``, or skip the calling test when no installed plugin provides it."""
    import pytest  # only the test run needs pytest; importing this module must not

    try:
        return get_backend(name)
    except UnknownNameError as exc:
        pytest.skip(str(exc))
