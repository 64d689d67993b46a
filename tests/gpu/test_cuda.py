"""mq on CUDA tensors (issue 16, item 4): observers, fake quantizers, QAT modules, calibration with export and
verification, the learnable quantizers, every PTQ method and ``mq quantize --device cuda``.

Every test is marked ``gpu`` and skips where torch sees no CUDA device, so the suite passes on CPU-only machines;
``benchmarks/gpu_check.sh`` runs them (``pytest -m gpu tests/gpu``) on a machine with one. Each test compares the
CUDA result with the same computation on the CPU where the two must agree (exactly where the operations are
elementwise and IEEE-exact on both, to float tolerance where a reduction or a convolution sums in another order),
and checks that nothing the computation produced was left on, or moved to, the CPU.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import mq_core as mq
from mq_core.nn.fused import FUSED_MODULES
from mq_core.nn.qat import QAT_MODULES
from mq_core.quant.fake_quant import FakeQuantizer
from mq_core.quant.scheme import INT8_SYM_PER_CHANNEL, UINT8_AFFINE, QuantScheme
from mq_core.testing.zoo import ZOO, AttentionBlock

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); benchmarks/gpu_check.sh "
                              "runs these on a GPU machine"),
]

CUDA = torch.device("cuda")
#: The observers mq-core registers (``mq_core.builtin.register_observers``).
BUILTIN_OBSERVERS = ("minmax", "ema_minmax", "percentile", "mse", "kl", "clip_std")
#: Relative tolerance of each observer's CUDA scale against the CPU one. min/max and its EMA are elementwise (exact,
#: the qparams divide by a tensor: CUDA turns ``tensor / number`` into a multiplication by the reciprocal); the
#: percentile histogram counts are integers; clip_std sums in float64 in another order; KL's divergences go through
#: log and sums, so a near-tie may pick a neighbouring bin (1/2048 of the range); MSE's errors are means, so a
#: near-tie may pick a neighbouring candidate (1% of the range), and its running mean divides by a number.
OBSERVER_RTOL = {"minmax": 0.0, "ema_minmax": 0.0, "percentile": 1e-5, "clip_std": 1e-5, "kl": 2e-3, "mse": 2e-2}


@pytest.fixture(autouse=True)
def _ieee_float32() -> Iterator[None]:
    """CUDA convolutions and matmuls in full float32 (no TF32, whose 10-bit mantissa would differ from the CPU by
    about 1e-3), and a fixed seed."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _batches(shape: tuple[int, ...], count: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Heavy-tailed batches (a few large values, as activations have), generated on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen)) for _ in range(count)]


def _all_on(module: nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on ``device`` (expected: none)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in tensors if t.device.type != device.type]


# --- observers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [UINT8_AFFINE, INT8_SYM_PER_CHANNEL], ids=["uint8-affine", "int8-per-channel"])
@pytest.mark.parametrize("name", BUILTIN_OBSERVERS)
def test_observer_on_cuda_gives_the_cpu_qparams(name: str, scheme: QuantScheme) -> None:
    assert set(BUILTIN_OBSERVERS) <= set(mq.list_observers())
    cls = mq.get_observer(name)
    if scheme.per_channel and not cls.per_channel_supported:
        pytest.skip(f"{name} observes per tensor only")
    batches = _batches((6, 8, 5, 5))
    qparams = []
    for device in (torch.device("cpu"), CUDA):
        observer = cls(scheme).to(device)
        for batch in batches:
            observer(batch.to(device))
        scale, zero_point = observer.calculate_qparams()
        assert scale.device.type == zero_point.device.type == device.type
        assert _all_on(observer, device) == []
        qparams.append((scale.cpu(), zero_point.cpu()))
    (cpu_scale, cpu_zp), (cuda_scale, cuda_zp) = qparams
    torch.testing.assert_close(cuda_scale, cpu_scale, rtol=OBSERVER_RTOL[name], atol=0)
    assert (cuda_zp - cpu_zp).abs().max() <= (0 if OBSERVER_RTOL[name] == 0 else 2)


# --- fake quantizer -------------------------------------------------------------------------------------------


def _fake_quantizer(scheme: QuantScheme, exact: bool, x: torch.Tensor) -> FakeQuantizer:
    fq = FakeQuantizer(scheme, mq.get_observer("minmax")(scheme), exact=exact)
    fq.enable_observation(True)
    fq(x)
    fq.enable_observation(False)
    fq.enable_quantization(True)
    return fq


@pytest.mark.parametrize("scheme", [UINT8_AFFINE, INT8_SYM_PER_CHANNEL.replace(ch_axis=1)],
                         ids=["uint8-affine", "int8-per-channel"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_fake_quantizer_on_cuda_equals_cpu(scheme: QuantScheme, exact: bool) -> None:
    """Exact rounding divides by the scale on both devices (IEEE division, round half to even): bit-identical
    values and gradients. The fast path is torch's multiply-by-inverse kernels, whose CPU and CUDA versions may
    round a value within an ulp of a tie differently: one step apart, for a vanishing fraction of the elements."""
    x = _batches((8, 16, 6, 6), count=1)[0]
    fq = _fake_quantizer(scheme, exact, x)
    results = []
    for device in (torch.device("cpu"), CUDA):
        quantizer = copy.deepcopy(fq).to(device)
        leaf = x.to(device).requires_grad_(True)
        out = quantizer(leaf)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(device))
        assert out.device.type == leaf.grad.device.type == device.type
        results.append((out.detach().cpu(), leaf.grad.cpu()))
    (cpu_out, cpu_grad), (cuda_out, cuda_grad) = results
    if exact:
        assert torch.equal(cuda_out, cpu_out)
        assert torch.equal(cuda_grad, cpu_grad)
    else:
        differ = (cuda_out != cpu_out) | (cuda_grad != cpu_grad)
        assert differ.float().mean() < 1e-3
        step = fq.scale.max()
        assert (cuda_out - cpu_out).abs().max() <= step * 1.001


# --- QAT module -----------------------------------------------------------------------------------------------


def _qat_conv_bn_relu() -> nn.Module:
    """A QAT Conv2d + BatchNorm2d + ReLU (``mq_core.nn.QConvBn2d`` with its activation) with a calibrated
    per-channel weight quantizer and non-trivial BN statistics."""
    conv, bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    fused = FUSED_MODULES[nn.Conv2d, True, True](conv, bn, nn.ReLU())
    scheme = QuantScheme(8, per_channel=True, narrow_range=True)
    weight_fq = FakeQuantizer(scheme, mq.get_observer("minmax")(scheme))
    qat = QAT_MODULES[type(fused)].from_float(fused, weight_fq)
    weight_fq.enable_observation(True)
    qat.train()(torch.randn(2, 4, 8, 8))
    weight_fq.enable_observation(False)
    weight_fq.enable_quantization(True)
    return qat


def test_qat_conv_bn_trains_on_cuda_as_on_cpu() -> None:
    qat = _qat_conv_bn_relu()
    data = _batches((4, 4, 8, 8), count=4, seed=3)
    runs = []
    for device in (torch.device("cpu"), CUDA):
        model = copy.deepcopy(qat).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for x in data:
            optimizer.zero_grad()
            loss = model(x.to(device)).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert _all_on(model, device) == []
        runs.append((torch.stack(losses).cpu(), {k: v.detach().cpu() for k, v in model.state_dict().items()}))
    (cpu_losses, cpu_state), (cuda_losses, cuda_state) = runs
    # cuDNN sums the convolution and the batch statistics in another order (about 1e-7 relative), which may move a
    # folded weight across a rounding boundary: a few 1e-4 at most after four steps.
    torch.testing.assert_close(cuda_losses, cpu_losses, rtol=1e-3, atol=1e-6)
    for key, value in cpu_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(cuda_state[key], value, rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(cuda_state[key], value), key


# --- calibration, export, verification ------------------------------------------------------------------------


def test_calibrate_on_cuda_then_export_and_verify(tmp_path: Path) -> None:
    """``mq.calibrate(qmodel.cuda(), data)`` with the data on the CPU: the batches follow the model; the qparams
    are the CPU calibration's to float tolerance (convolutions sum in another order); the model moved back to the
    CPU exports and verifies in ONNX Runtime."""
    entry = ZOO["resnet"]
    example, data = entry.inputs(2), entry.calibration_data()
    cpu_model = mq.prepare(entry.build(), "qdq", example)
    mq.calibrate(cpu_model, data, progress=False)
    qmodel = mq.prepare(entry.build(), "qdq", example).to(CUDA)
    mq.calibrate(qmodel, data, progress=False)
    assert _all_on(qmodel, CUDA) == []
    cpu_fqs, cuda_fqs = mq.quantizers(cpu_model), mq.quantizers(qmodel)
    assert cuda_fqs.keys() == cpu_fqs.keys()
    for name, fq in cuda_fqs.items():
        assert fq.is_calibrated, name
        torch.testing.assert_close(fq.scale.cpu(), cpu_fqs[name].scale, rtol=1e-4, atol=0, msg=name)
        assert (fq.zero_point.cpu() - cpu_fqs[name].zero_point).abs().max() <= 1, name
    with torch.no_grad():
        on_cuda = qmodel(entry.inputs(3, seed=7).to(CUDA)).cpu()
    qmodel.cpu()
    with torch.no_grad():
        on_cpu = qmodel(entry.inputs(3, seed=7))
    torch.testing.assert_close(on_cuda, on_cpu, rtol=0.02, atol=0.02 * float(on_cpu.abs().max()))
    exported = mq.export(qmodel, example, tmp_path / "export")
    report = mq.verify(exported, entry.inputs(3, seed=7), runtimes=["onnxruntime"])
    assert report.passed, report


@pytest.mark.parametrize("preset", [None, "w4a4-lsq"], ids=["fixed", "lsq"])
def test_cpu_checkpoint_loads_into_a_cuda_model(preset: str | None, tmp_path: Path) -> None:
    """Per-channel qparams and observer statistics are resized from the checkpoint's shapes when it loads; the
    resized tensors stay on the model's device (they used to be created on the checkpoint's, the CPU)."""
    entry = ZOO["resnet"]
    example = entry.inputs(2)
    source = mq.prepare(entry.build(), "qdq", example, qconfig=preset, mode="qat" if preset else "ptq")
    mq.calibrate(source, entry.calibration_data(), progress=False)
    torch.save(source.state_dict(), tmp_path / "qmodel.pt")
    target = mq.prepare(entry.build(), "qdq", example, qconfig=preset, mode="qat" if preset else "ptq").to(CUDA)
    target.load_state_dict(torch.load(tmp_path / "qmodel.pt", map_location="cpu", weights_only=True))
    assert _all_on(target, CUDA) == []
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(example.to(CUDA)).cpu(), source(example), rtol=0.02,
                                   atol=0.02 * float(source(example).abs().max()))


# --- mq-algos learnable quantizers ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [QuantScheme(4, signed=False, symmetric=True),
                                    QuantScheme(4, per_channel=True, ch_axis=1)], ids=["uint4", "int4-per-channel"])
@pytest.mark.parametrize("name", ["lsq", "pact"])
def test_learnable_quantizer_forward_backward_on_cuda(name: str, scheme: QuantScheme) -> None:
    """The paper forward is elementwise (same values on both devices); the scale/alpha gradient is a sum over the
    tensor, so it agrees to float tolerance."""
    x = _batches((8, 6, 5, 5), count=1)[0].abs() if not scheme.signed else _batches((8, 6, 5, 5), count=1)[0]
    fq = mq.get_fake_quantizer(name)(scheme, mq.get_observer("minmax")(scheme))
    fq.enable_observation(True)
    fq(x)
    fq.enable_observation(False)
    fq.enable_quantization(True)
    results = []
    for device in (torch.device("cpu"), CUDA):
        quantizer = copy.deepcopy(fq).to(device).train()
        leaf = x.to(device).requires_grad_(True)
        out = quantizer(leaf)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(device))
        (param,) = list(quantizer.parameters())
        assert param.grad is not None and param.grad.device.type == device.type
        results.append((out.detach().cpu(), leaf.grad.cpu(), param.grad.cpu()))
    (cpu_out, cpu_gx, cpu_gp), (cuda_out, cuda_gx, cuda_gp) = results
    assert torch.equal(cuda_out, cpu_out)
    assert torch.equal(cuda_gx, cpu_gx)
    torch.testing.assert_close(cuda_gp, cpu_gp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["w4a4-lsq", "w4a4-pact"])
def test_learnable_qat_preset_trains_on_cuda(preset: str) -> None:
    entry = ZOO["resnet"]
    qmodel = mq.prepare(entry.build(), "qdq", entry.inputs(2), qconfig=preset, mode="qat").to(CUDA)
    mq.calibrate(qmodel, entry.calibration_data(), progress=False)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01, momentum=0.9)
    qmodel.train()
    for x in entry.calibration_data(batches=3, seed=11):
        optimizer.zero_grad()
        loss = qmodel(x.to(CUDA)).square().mean()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert _all_on(qmodel, CUDA) == []


# --- PTQ methods ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [("adaround", {"iterations": 20}), ("brecq", {"iterations": 20}),
                                            ("qdrop", {"iterations": 20}), ("cle", {}), ("bias_correction", {})])
def test_ptq_method_runs_on_a_cuda_model(method: str, options: dict[str, int]) -> None:
    """Each method on the zoo's residual net, moved to CUDA before, with the calibration data on the CPU. The
    reconstruction methods draw their random batches from a generator on the model's device, so they are checked
    for running and staying on it; CLE and bias correction are deterministic and give the CPU's weights."""
    entry = ZOO["resnet"]
    example, data = entry.inputs(2), entry.calibration_data()
    results = []
    for device in (torch.device("cpu"), CUDA):
        qmodel = mq.prepare(entry.build(), "qdq", example).to(device)
        if method != "cle":  # cle equalizes first and calibrates after itself
            mq.calibrate(qmodel, data, progress=False)
        mq.ptq(qmodel, method, data, progress=False, **options)
        assert _all_on(qmodel, device) == []
        assert all(fq.is_calibrated for fq in mq.quantizers(qmodel).values())
        with torch.no_grad():
            out = qmodel(entry.inputs(3, seed=7).to(device))
        assert torch.isfinite(out).all()
        results.append({k: v.detach().cpu() for k, v in qmodel.named_parameters()})
    if method in ("cle", "bias_correction"):
        cpu_params, cuda_params = results
        for name, value in cpu_params.items():
            torch.testing.assert_close(cuda_params[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_smoothquant_on_a_cuda_transformer_block() -> None:
    torch.manual_seed(0)
    model = AttentionBlock(dim=16, heads=2).eval()
    tokens = torch.randn(16, 6, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
    qmodel = mq.prepare(model, "qdq", (tokens[:1],)).to(CUDA)
    mq.ptq(qmodel, "smoothquant", tokens, progress=False)
    assert _all_on(qmodel, CUDA) == []
    assert all(fq.is_calibrated for fq in mq.quantizers(qmodel).values())
    with torch.no_grad():
        got = qmodel(tokens.to(CUDA)).cpu()
    assert float((got - want).norm() / want.norm()) < 0.1


# --- command line ---------------------------------------------------------------------------------------------


def test_mq_quantize_device_cuda_on_the_digits_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mq_core.cli.main import cli

    monkeypatch.setenv("MQ_CACHE_DIR", str(tmp_path / "cache"))  # the demo model trains into a private cache
    result = CliRunner().invoke(cli, ["quantize", "--device", "cuda", "--backend", "qdq", "--out",
                                      str(tmp_path / "out"), "--no-report", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    outcome = summary["backends"][0]
    assert outcome["simulated_accuracy"] >= summary["float_accuracy"] - 1.0
    assert outcome["deployed_accuracy"] == pytest.approx(outcome["simulated_accuracy"], abs=0.5)
