"""The plugin contract: one pluggy hook per kind of extension (project name ``"mq"``).

A plugin is a module named by an entry point in the group ``mq``::

    [project.entry-points.mq]
    mybackend = "my_package.plugin"

whose functions are decorated with ``mq_core.hookimpl`` and named after the hooks below. Each registry hook gets a
``register`` callable; call it once per item. Annotate it as the hook below does (``Register[Backend]``,
``RegisterQATModule``, ... from ``mq_core.plugin_api``) and a type checker checks what is registered. Hooks run
lazily, the first time any registry is used, once per process. Everything a plugin registers is recorded with its
distribution name and version (``mq plugins``).
Names and aliases follow one rule (``mq_core.plugins.registry.NAME_RULE``, docs/plugins.md); a name outside it, a
name registered twice from one distribution, or a hook that raises (``SystemExit`` included) fails the plugin as a
whole: it is skipped with a warning and nothing it registered is kept. The same name from two distributions is a
conflict that ``MQ_PREFER`` resolves; a name the core registers stays the core's unless ``MQ_PREFER`` names the
plugin. The core registers its own built-ins through these same hooks (``mq_core.builtin``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, TypeVar

import pluggy

if TYPE_CHECKING:  # annotations only: the contract module imports nothing from the layers above it
    import click
    from torch import nn

    from mq_core.backend import Backend
    from mq_core.export.exporter import Exporter
    from mq_core.graph.fusion import FusionPattern
    from mq_core.pipeline.ptq import PTQMethod
    from mq_core.quant.fake_quant import FakeQuantizer
    from mq_core.quant.observers.base import Observer
    from mq_core.quant.qconfig import QConfigPreset
    from mq_core.runtimes.base import Runtime

hookspec = pluggy.HookspecMarker("mq")
hookimpl = pluggy.HookimplMarker("mq")

T = TypeVar("T", contravariant=True)


class Register(Protocol[T]):
    """The ``register`` callable a registry hook receives; ``Register[Backend]`` takes backends, and so on.

    ``name``, ``aliases`` and ``description`` default to the object's attributes of those names (for a class:
    ``description`` defaults to the first line of its docstring); a single alias may be given as a string.
    Annotating a hook's ``register`` with it lets a type checker catch an item registered with the wrong hook;
    at run time pluggy matches hook arguments by name only.
    """

    def __call__(
        self,
        obj: T,
        /,
        name: str | None = None,
        aliases: Iterable[str] | str | None = None,
        description: str | None = None,
    ) -> None: ...


class RegisterQATModule(Protocol):
    """The ``register`` callable of ``register_qat_modules``: one float module type and its QAT replacement."""

    def __call__(self, float_type: type[nn.Module], qat_type: type[nn.Module], /) -> None: ...


@hookspec
def register_backends(register: Register[Backend]) -> None:
    """Register deployment targets.

    Call ``register(backend)`` with a ``mq_core.Backend``: its name, aliases, description, default QConfig
    (weight/activation grids and observers), placement policy, supported bit widths and exporter names. Lookup
    is case-insensitive over the name and aliases: ``get_backend("trt")``.
    """


@hookspec
def register_qconfigs(register: Register[QConfigPreset]) -> None:
    """Register named qconfig presets that combine with any backend.

    Call ``register(preset)`` with a ``mq_core.QConfigPreset`` (e.g. ``w4a4-lsq``: 4-bit weights and activations,
    LSQ quantizers). The backend keeps deciding signedness, symmetry and granularity and refuses bit widths its
    runtime cannot execute.
    """


@hookspec
def register_observers(register: Register[type[Observer]]) -> None:
    """Register range estimators.

    Call ``register(observer_class, name="kl", aliases=("entropy",))``. The class is a ``mq_core.Observer``
    subclass constructed as ``cls(scheme, **options)``.
    """


@hookspec
def register_fake_quantizers(register: Register[type[FakeQuantizer]]) -> None:
    """Register fake-quantizer types.

    Call ``register(fake_quantizer_class, name="lsq")``. The class subclasses ``mq_core.FakeQuantizer`` and is
    constructed as ``cls(scheme, observer, exact=..., **options)``; it must implement ``export_qparams()`` so the
    deploy view can freeze it into fixed qparams.
    """


@hookspec
def register_fusion_patterns(register: Register[FusionPattern]) -> None:
    """Register fusion patterns (module/function sequences replaced by one fused module).

    Call ``register(pattern)`` with a ``mq_core.plugin_api.FusionPattern``. Patterns are tried longest first.
    """


@hookspec
def register_qat_modules(register: RegisterQATModule) -> None:
    """Map float module types to QAT module types.

    Call ``register(float_type, qat_type)``. ``qat_type.from_float(module, weight_fake_quant)`` builds the QAT
    module and ``qat_type.weight_ch_axis`` names the weight's output-channel axis.
    """


@hookspec
def register_exporters(register: Register[Exporter]) -> None:
    """Register exporters.

    Call ``register(exporter)`` with a ``mq_core.Exporter``: a name, the backends it serves and an
    ``export(context) -> list[Artifact]`` method that starts from the canonical QDQ ONNX.
    """


@hookspec
def register_runtimes(register: Register[Runtime]) -> None:
    """Register real executors used to verify artifacts.

    Call ``register(runtime)`` with a ``mq_core.Runtime``: a name, the artifact kinds it runs, ``available()``
    and ``run(path, inputs)``. Runtimes whose package is missing stay registered and report themselves
    unavailable.
    """


@hookspec
def register_ptq_methods(register: Register[PTQMethod]) -> None:
    """Register post-training quantization methods.

    Call ``register(method)`` with a ``mq_core.PTQMethod``: a name, a config dataclass with documented defaults,
    and ``apply(qmodel, data, config)``. Called by ``mq.ptq(qmodel, name, data)``.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``mq`` command line.

    ``cli`` is the root ``click.Group``; use ``@cli.command()`` or ``cli.add_command(...)``. Called when the
    ``mq`` command starts. Only new names: a hook that replaces or removes a core command (``verify``, ...) or
    another plugin's, even under another case, fails its plugin and the command line stays as it was.
    """


#: The registry hooks, in the order they are loaded; each maps to the registry kind it fills.
REGISTRY_HOOKS: dict[str, str] = {
    "register_backends": "backend",
    "register_qconfigs": "qconfig",
    "register_observers": "observer",
    "register_fake_quantizers": "fake_quantizer",
    "register_fusion_patterns": "fusion_pattern",
    "register_qat_modules": "qat_module",
    "register_exporters": "exporter",
    "register_runtimes": "runtime",
    "register_ptq_methods": "ptq_method",
}
