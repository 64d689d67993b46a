"""Entry point of mq-plugin-example (``[project.entry-points.mq]`` in ``pyproject.toml``).

mq imports this module the first time any registry is used and calls each function below that is named after a
hook in ``mq_core.hookspecs`` and decorated with ``mq_core.hookimpl``. Each hook receives a ``register``
callable: call it once per item. mq records this distribution's name and version with everything registered
(``mq plugins`` shows it), so ``get_backend("pot-npu")`` can always say where the backend came from.

Keep this module cheap to import and free of side effects: it runs in every process that uses mq.
"""

from mq_core.plugin_api import Backend, Exporter, Register, hookimpl
from mq_plugin_example.backend import POT_NPU
from mq_plugin_example.exporter import PotNpuExporter


@hookimpl
def register_backends(register: Register[Backend]) -> None:
    register(POT_NPU)


@hookimpl
def register_exporters(register: Register[Exporter]) -> None:
    register(PotNpuExporter())
