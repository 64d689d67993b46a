"""The plugin system through real entry points of really installed distributions."""

from __future__ import annotations

import warnings

import pytest

import mq_core as mq
from mq_core.pipeline.resolve import build_quantizer
from mq_core.plugins import MQPluginWarning, get_manager

FIRST_PARTY = {
    "mq-trt": ("tensorrt", ["trt", "TensorRT", "TRT"]),
    "mq-snpe": ("snpe", ["qnn", "SNPE"]),
    "mq-tvm": ("tvm", ["TVM"]),
    "mq-openvino": ("openvino", ["ov", "OpenVINO"]),
    "mq-tengine": ("tengine", ["Tengine"]),
}


def _record(dist: str):
    record = get_manager().record_for(dist)
    assert record is not None, f"{dist} not discovered"
    return record


@pytest.mark.parametrize("dist", sorted(FIRST_PARTY))
def test_first_party_backends_resolve_by_name_and_alias(dist: str) -> None:
    name, aliases = FIRST_PARTY[dist]
    backend = mq.get_backend(name)
    assert backend.name == name
    for alias in aliases:
        assert mq.get_backend(alias) is backend
    entry = mq.get_entry("backend", name)
    assert entry.distribution == dist
    assert entry.version == "0.1.0"
    assert _record(dist).status == "loaded"


def test_every_first_party_distribution_is_loaded() -> None:
    for dist in [*FIRST_PARTY, "mq-algos", "mq-core"]:
        assert _record(dist).status == "loaded"


def test_core_builtins_register_through_the_hooks_with_provenance() -> None:
    assert mq.get_entry("observer", "minmax").distribution == "mq-core"
    assert mq.get_entry("backend", "ORT").obj is mq.get_backend("qdq")
    assert "fixed" in mq.list_fake_quantizers()


def test_third_party_plugin_discovered_with_provenance(plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-example-backend")
    backend = mq.get_backend("example")
    assert mq.get_backend("EX") is backend
    assert mq.get_backend("example-target") is backend
    entry = mq.get_entry("backend", "ex")
    assert (entry.distribution, entry.version) == ("mq-example-backend", "1.2.3")
    assert mq.get_entry("observer", "example_absmax").distribution == "mq-example-backend"
    # the third-party observer is usable by name in a QConfig
    fq = build_quantizer(backend.qconfig.activation)
    assert type(fq.observer).__name__ == "AbsMaxObserver"


def test_plugin_failing_on_import_warns_once_and_the_rest_works(plugin_env) -> None:
    with pytest.warns(MQPluginWarning, match=r"mq-example-broken 0\.0\.1.*libexample_runtime\.so") as caught:
        plugin_env(MQ_PLUGINS="mq-example-broken,mq-example-backend,mq-trt")
        assert mq.get_backend("tensorrt").name == "tensorrt"
    assert len([w for w in caught if issubclass(w.category, MQPluginWarning)]) == 1
    record = _record("mq-example-broken")
    assert record.status == "failed"
    assert "ImportError" in record.error
    assert mq.get_backend("example").name == "example"


def test_plugin_whose_hook_raises_leaves_nothing_registered(plugin_env) -> None:
    with pytest.warns(MQPluginWarning, match=r"mq-example-badhook.*malformed"):
        plugin_env(MQ_PLUGINS="mq-example-badhook")
        names = mq.list_observers()
    assert "badhook_minmax" not in names
    assert "minmax" in names
    assert _record("mq-example-badhook").status == "failed"


def test_conflict_names_both_distributions_and_can_be_resolved(plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-trt,mq-example-conflict")
    with pytest.raises(mq.PluginConflictError) as err:
        mq.get_backend("tensorrt")
    message = str(err.value)
    assert "mq-trt 0.1.0" in message and "mq-example-conflict 0.5.0" in message and "MQ_PREFER" in message
    # names the conflict does not touch keep working
    assert mq.get_backend("trt").name == "tensorrt"
    # a claim on a core name is a conflict too, but the core keeps its name unless MQ_PREFER says otherwise
    assert mq.get_entry("observer", "ema").distribution == "mq-core"
    assert [e.distribution for e in get_manager().registries["observer"].conflicts()["ema"]] == [
        "mq-core", "mq-example-conflict"]

    plugin_env(MQ_PLUGINS="mq-trt,mq-example-conflict", MQ_PREFER="mq-trt")
    assert mq.get_entry("backend", "tensorrt").distribution == "mq-trt"
    plugin_env(MQ_PLUGINS="mq-trt,mq-example-conflict", MQ_PREFER="mq_example_conflict")
    assert mq.get_backend("tensorrt").description == "not the real TensorRT"
    assert mq.get_entry("observer", "ema").distribution == "mq-example-conflict"


def test_mq_plugins_restricts_loading(plugin_env) -> None:
    plugin_env(MQ_PLUGINS="mq-example-backend")
    assert set(mq.list_backends()) == {"qdq", "example"}
    assert _record("mq-trt").status == "disabled"
    with pytest.raises(mq.UnknownNameError, match=r"mq-trt.*not loaded.*MQ_PLUGINS"):
        mq.get_backend("tensorrt")


def test_disable_plugins_loads_builtins_only(plugin_env) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MQPluginWarning)  # the broken fixture is not even imported
        plugin_env(MQ_DISABLE_PLUGINS="1")
        assert mq.list_backends() == ["qdq"]
    assert [r.distribution for r in get_manager().records] == ["mq-core"]


def test_unknown_names_list_what_is_installed() -> None:
    with pytest.raises(mq.UnknownNameError) as err:
        mq.get_backend("nosuchtarget")
    assert "installed backends: " in str(err.value).lower() and "tensorrt" in str(err.value)
    with pytest.raises(LookupError):
        mq.get_observer("nosuch")


def test_uninstalled_first_party_backend_says_which_package(plugin_env) -> None:
    plugin_env(MQ_DISABLE_PLUGINS="1")
    with pytest.raises(mq.UnknownNameError, match=r"backend 'openvino' is not installed: pip install mq-openvino"):
        mq.get_backend("openvino")
    with pytest.raises(mq.UnknownNameError, match=r"pip install mq-trt"):
        mq.get_backend("TRT")


def test_registering_a_name_twice_in_one_distribution_is_a_plugin_bug() -> None:
    from mq_core.plugins.registry import Entry, Registry

    registry = Registry("backend")
    registry.add(Entry("backend", "a", object(), aliases=("x",), distribution="d"))
    with pytest.raises(ValueError, match="registers backend 'x' twice"):
        registry.add(Entry("backend", "b", object(), aliases=("X",), distribution="d"))
