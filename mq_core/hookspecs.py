"""The plugin contract: one pluggy hook per kind of extension (project name ``"mq"``).

A plugin is a module named by an entry point in the group ``mq``::

    [project.entry-points.mq]
    mybackend = "my_package.plugin"

whose functions are decorated with ``mq_core.hookimpl`` and named after the hooks below. Each registry hook gets a
``register`` callable; call it once per item. Hooks run lazily, the first time any registry is used, once per
process. Everything a plugin registers is recorded with its distribution name and version (``mq plugins``).
Names and aliases follow one rule (``mq_core.plugins.registry.NAME_RULE``, docs/plugins.md); a name outside it, a
name registered twice from one distribution, or a hook that raises (``SystemExit`` included) fails the plugin as a
whole: it is skipped with a warning and nothing it registered is kept. The same name from two distributions is a
conflict that ``MQ_PREFER`` resolves; a name the core registers stays the core's unless ``MQ_PREFER`` names the
plugin. The core registers its own built-ins through these same hooks (``mq_core.builtin``).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("mq")
hookimpl = pluggy.HookimplMarker("mq")


@hookspec
def register_backends(register: Any) -> None:
    """Register deployment targets.

    Call ``register(backend)`` with a ``mq_core.Backend``: its name, aliases, description, default QConfig
    (weight/activation grids and observers), placement policy, supported bit widths and exporter names. Lookup
    is case-insensitive over the name and aliases: ``get_backend("trt")``.
    """


@hookspec
def register_qconfigs(register: Any) -> None:
    """Register named qconfig presets that combine with any backend.

    Call ``register(preset)`` with a ``mq_core.QConfigPreset`` (e.g. ``w4a4-lsq``: 4-bit weights and activations,
    LSQ quantizers). The backend keeps deciding signedness, symmetry and granularity and refuses bit widths its
    runtime cannot execute.
    """


@hookspec
def register_observers(register: Any) -> None:
    """Register range estimators.

    Call ``register(observer_class, name="kl", aliases=("entropy",))``. The class is a ``mq_core.Observer``
    subclass constructed as ``cls(scheme, **options)``.
    """


@hookspec
def register_fake_quantizers(register: Any) -> None:
    """Register fake-quantizer types.

    Call ``register(fake_quantizer_class, name="lsq")``. The class subclasses ``mq_core.FakeQuantizer`` and is
    constructed as ``cls(scheme, observer, exact=..., **options)``; it must implement ``export_qparams()`` so the
    deploy view can freeze it into fixed qparams.
    """


@hookspec
def register_fusion_patterns(register: Any) -> None:
    """Register fusion patterns (module/function sequences replaced by one fused module).

    Call ``register(pattern)`` with a ``mq_core.FusionPattern``. Patterns are tried longest first.
    """


@hookspec
def register_qat_modules(register: Any) -> None:
    """Map float module types to QAT module types.

    Call ``register(float_type, qat_type)``. ``qat_type.from_float(module, weight_fake_quant)`` builds the QAT
    module and ``qat_type.weight_ch_axis`` names the weight's output-channel axis.
    """


@hookspec
def register_exporters(register: Any) -> None:
    """Register exporters.

    Call ``register(exporter)`` with a ``mq_core.Exporter``: a name, the backends it serves and an
    ``export(context) -> list[Artifact]`` method that starts from the canonical QDQ ONNX.
    """


@hookspec
def register_runtimes(register: Any) -> None:
    """Register real executors used to verify artifacts.

    Call ``register(runtime)`` with a ``mq_core.Runtime``: a name, the artifact kinds it runs, ``available()``
    and ``run(path, inputs)``. Runtimes whose package is missing stay registered and report themselves
    unavailable.
    """


@hookspec
def register_ptq_methods(register: Any) -> None:
    """Register post-training quantization methods.

    Call ``register(method)`` with a ``mq_core.PTQMethod``: a name, a config dataclass with documented defaults,
    and ``apply(qmodel, data, config)``. Called by ``mq.ptq(qmodel, name, data)``.
    """


@hookspec
def register_commands(cli: Any) -> None:
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
