"""The ``fixed`` fake quantizer: buffers, switches, per-tensor/per-channel, exact vs fast rounding, STE, repr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mq_core import CalibrationError, FakeQuantizer, QuantScheme, get_fake_quantizer
from mq_core.quant.fake_quant import FixedFakeQuantizer
from mq_core.quant.functional import along_axis, fake_quantize
from mq_core.quant.observers.minmax import MinMaxObserver

pytestmark = pytest.mark.usefixtures("deterministic")


def fixed(scheme: QuantScheme, exact: bool = True) -> FakeQuantizer:
    fq = get_fake_quantizer("fixed")(scheme, MinMaxObserver(scheme), exact=exact)
    fq.qname = "test.fq"
    return fq


def with_qparams(scheme: QuantScheme, scale: float | list[float], zp: int | list[int], exact: bool) -> FakeQuantizer:
    fq = fixed(scheme, exact)
    fq.set_qparams(torch.tensor(scale), torch.tensor(zp))
    fq.enable_quantization(True)
    return fq


def numpy_qdq(x: np.ndarray, s: np.float32, z: int, qmin: int, qmax: int, fast: bool = False) -> np.ndarray:
    """Reference quantize-dequantize in float32: ONNX Runtime's x / s, or torch's kernel x * (1 / s)."""
    x = x.astype(np.float32)
    v = x * (np.float32(1) / s) if fast else x / s
    q = np.clip(np.round(v) + np.float32(z), qmin, qmax).astype(np.float32)
    return ((q - np.float32(z)) * s).astype(np.float32)


# --- module basics --------------------------------------------------------------------------------------------------
def test_fixed_is_registered_and_qparams_are_buffers() -> None:
    assert get_fake_quantizer("fixed") is FixedFakeQuantizer
    fq = fixed(QuantScheme(8))
    buffers = dict(fq.named_buffers())
    assert {"scale", "zero_point", "observe_enabled", "quant_enabled", "calibrated"} <= set(buffers)
    assert buffers["scale"].dtype == torch.float32 and buffers["zero_point"].dtype == torch.int32
    assert list(fq.parameters()) == []
    assert {"scale", "zero_point"} <= set(fq.state_dict())


def test_switches() -> None:
    fq = fixed(QuantScheme(8))
    x = torch.linspace(-1.0, 2.0, 11)
    # both switches off: identity, nothing observed
    assert fq(x) is x
    assert not fq.observer.observed
    # observe only: output untouched, observer fed
    fq.enable_observation(True)
    assert torch.equal(fq(x), x)
    assert fq.observer.observed and not fq.is_calibrated
    # switching observation off freezes the qparams
    fq.enable_observation(False)
    assert fq.is_calibrated
    assert fq.scale.item() == pytest.approx(2.0 / 127)
    assert torch.equal(fq(x), x)  # still not quantizing
    fq.enable_quantization(True)
    y = fq(x)
    assert not torch.equal(y, x)
    codes = y / fq.scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    fq(x * 10)  # observation is off: the range stays frozen
    assert fq.scale.item() == pytest.approx(2.0 / 127)


def test_observe_and_quantize_together_refreshes_qparams_every_batch() -> None:
    fq = fixed(QuantScheme(8))
    fq.enable_observation(True)
    fq.enable_quantization(True)
    fq(torch.tensor([-1.0, 1.0]))
    assert fq.scale.item() == pytest.approx(1.0 / 127)
    y = fq(torch.tensor([0.0, 4.0]))  # the quantized output already uses the widened range
    assert fq.scale.item() == pytest.approx(4.0 / 127)
    assert y[1].item() == pytest.approx(4.0, rel=1e-6)


def test_quantizing_uncalibrated_raises_naming_the_quantizer() -> None:
    fq = fixed(QuantScheme(8))
    fq.enable_quantization(True)
    with pytest.raises(CalibrationError, match=r"test\.fq"):
        fq(torch.ones(3))
    with pytest.raises(CalibrationError, match=r"test\.fq"):
        fq.update_qparams()


def test_non_finite_input_while_observing_raises() -> None:
    fq = fixed(QuantScheme(8))
    fq.enable_observation(True)
    with pytest.raises(CalibrationError, match=r"test\.fq.*NaN or Inf"):
        fq(torch.tensor([0.0, float("inf")]))


# --- per-tensor / per-channel ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_per_tensor_affine_matches_reference(exact: bool) -> None:
    scheme = QuantScheme(8, signed=False, symmetric=False)
    fq = fixed(scheme, exact)
    x = torch.randn(4, 16) * 3
    fq.enable_observation(True)
    fq(x)
    fq.enable_observation(False)
    fq.enable_quantization(True)
    lo, hi = x.min().item(), x.max().item()
    assert fq.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    ref = numpy_qdq(x.numpy(), np.float32(fq.scale.item()), int(fq.zero_point), 0, 255, fast=not exact)
    np.testing.assert_array_equal(fq(x).numpy(), ref)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_per_channel_on_any_axis(axis: int, exact: bool) -> None:
    scheme = QuantScheme(8, per_channel=True, ch_axis=axis, narrow_range=True)
    fq = fixed(scheme, exact)
    x = torch.randn(3, 4, 5) * torch.arange(1, 6, dtype=torch.float32)  # channels of axis 2 differ in range
    fq.enable_observation(True)
    fq(x)
    fq.enable_observation(False)
    fq.enable_quantization(True)
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    expected = moved.abs().amax(dim=1) / 127
    assert fq.scale.shape == (x.shape[axis],)
    torch.testing.assert_close(fq.scale, expected, rtol=1e-6, atol=0)
    y = fq(x)
    shape = [1] * 3
    shape[axis] = -1
    codes = y / fq.scale.reshape(shape)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 127.001
    # each channel on its own grid: channel-wise max error is at most half of that channel's step
    err = (y - x).abs().movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
    assert (err <= expected / 2 + 1e-6).all()


def test_per_channel_scale_and_zero_point_resize_on_load() -> None:
    scheme = QuantScheme(8, signed=False, symmetric=False, per_channel=True, ch_axis=0)
    trained = with_qparams(scheme, [0.1, 0.2, 0.3], [3, 2, 1], exact=True)
    fresh = fixed(scheme)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.scale, trained.scale) and torch.equal(fresh.zero_point, trained.zero_point)
    x = torch.randn(3, 7)
    assert torch.equal(fresh(x), trained(x))


# --- exact vs fast rounding -----------------------------------------------------------------------------------------
#: (scale, x): x / s in float32 falls just below a .5 tie while x * (1 / s) lands on it (or the reverse), so the
#: exact path (ONNX Runtime's division) and torch's multiply-by-inverse kernel pick neighbouring levels.
TIES = [(0.3, 2.25), (0.01, 0.114999995), (0.03, 0.195)]


@pytest.mark.parametrize(("scale", "value"), TIES)
def test_exact_and_fast_differ_at_a_rounding_tie(scale: float, value: float) -> None:
    s, x = np.float32(scale), np.float32(value)
    ort_code = np.round(x / s)  # what ONNX Runtime's QuantizeLinear computes (float32 division)
    torch_code = np.round(x * (np.float32(1) / s))
    assert ort_code != torch_code  # the case is a real tie difference
    scheme = QuantScheme(8)
    exact = with_qparams(scheme, scale, 0, exact=True)
    fast = with_qparams(scheme, scale, 0, exact=False)
    xt = torch.tensor([value])
    assert (exact(xt) / exact.scale).round().item() == ort_code
    assert (fast(xt) / fast.scale).round().item() == torch_code
    kernel = torch.fake_quantize_per_tensor_affine(xt, torch.tensor(scale), torch.tensor(0, dtype=torch.int32),
                                                   -128, 127)
    assert torch.equal(fast(xt), kernel)
    assert torch.equal(exact(xt), torch.from_numpy(numpy_qdq(np.array([x]), s, 0, -128, 127)))


def test_exact_and_fast_differ_per_channel_too() -> None:
    scheme = QuantScheme(8, per_channel=True, ch_axis=0)
    scales, values = [t[0] for t in TIES], [t[1] for t in TIES]
    exact = with_qparams(scheme, scales, [0, 0, 0], exact=True)
    fast = with_qparams(scheme, scales, [0, 0, 0], exact=False)
    x = torch.tensor(values).reshape(3, 1)
    assert (exact(x) != fast(x)).all()
    kernel = torch.fake_quantize_per_channel_affine(x, torch.tensor(scales), torch.zeros(3, dtype=torch.int32), 0,
                                                    -128, 127)
    assert torch.equal(fast(x), kernel)


def test_exact_matches_float32_division_bit_for_bit_and_fast_agrees_off_ties() -> None:
    scheme = QuantScheme(8, signed=False, symmetric=False)
    s, z = np.float32(0.0173), 118
    x = np.random.default_rng(0).normal(0, 1.2, 20_000).astype(np.float32)
    exact = with_qparams(scheme, float(s), z, exact=True)
    fast = with_qparams(scheme, float(s), z, exact=False)
    y_exact, y_fast = exact(torch.from_numpy(x)).numpy(), fast(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(y_exact, numpy_qdq(x, s, z, 0, 255))
    np.testing.assert_array_equal(y_fast, numpy_qdq(x, s, z, 0, 255, fast=True))
    differ = y_exact != y_fast
    assert differ.sum() <= 5  # only values within an ulp of a tie differ ...
    assert np.all(np.abs(y_exact[differ] - y_fast[differ]) <= s * 1.001)  # ... and by exactly one step
    v = x[differ] / s
    assert np.all(np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-4)


def test_exact_path_matches_onnxruntime_quantize_linear() -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    s, z = np.float32(0.3), np.uint8(100)
    x = np.array([2.25, 3.7500002, 6.7500005, -0.45, 0.15, 10.0, -40.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])],
        [numpy_helper.from_array(np.array(s), "s"), numpy_helper.from_array(np.array(z), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    scheme = QuantScheme(8, signed=False, symmetric=False)
    exact = with_qparams(scheme, float(s), int(z), exact=True)
    fast = with_qparams(scheme, float(s), int(z), exact=False)
    np.testing.assert_array_equal(exact(torch.from_numpy(x)).numpy(), expected)
    assert not np.array_equal(fast(torch.from_numpy(x)).numpy(), expected)  # the tie cases above


def test_non_float32_inputs_always_take_the_exact_path() -> None:
    x = torch.tensor([2.25], dtype=torch.float64)
    out = fake_quantize(x, torch.tensor(0.3), torch.tensor(0), -128, 127, exact=False)
    assert out.dtype == torch.float64
    # 2.25 / float32(0.3) = 7.4999997 -> 7 (the float32 kernel would give 8)
    assert torch.equal(out, fake_quantize(x, torch.tensor(0.3), torch.tensor(0), -128, 127, exact=True))
    assert out.item() == pytest.approx(7 * 0.3, rel=1e-6)


def test_sixteen_bit_grids_work_on_both_paths() -> None:
    scheme = QuantScheme(16, signed=False, symmetric=False)
    x = torch.randn(1000)
    outs = []
    for exact in (True, False):
        fq = fixed(scheme, exact)
        fq.enable_observation(True)
        fq(x)
        fq.enable_observation(False)
        fq.enable_quantization(True)
        outs.append(fq(x))
    assert (outs[0] - x).abs().max() <= fq.scale.item() / 2 + 1e-7
    assert (outs[0] != outs[1]).sum() <= 2


# --- straight-through estimator ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize(
    ("scheme", "scale", "zp", "values", "grads"),
    [
        # int8 sym, s = 0.1: representable [-12.8, 12.7]
        (QuantScheme(8), 0.1, 0, [-20.0, -12.0, -0.33, 0.0, 5.0, 12.6, 13.5, 40.0], [0, 1, 1, 1, 1, 1, 0, 0]),
        # uint8 affine, s = 0.05, z = 40: representable [-2.0, 10.75]
        (QuantScheme(8, signed=False, symmetric=False), 0.05, 40, [-3.0, -1.9, 0.0, 10.7, 11.0],
         [0, 1, 1, 1, 0]),
    ],
)
def test_ste_gradient_is_one_inside_the_range_and_zero_outside(
    exact: bool, scheme: QuantScheme, scale: float, zp: int, values: list[float], grads: list[int]
) -> None:
    fq = with_qparams(scheme, scale, zp, exact)
    x = torch.tensor(values, requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [float(g) for g in grads]


def plain_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact path written as the plain composition of torch ops: the values and the boolean STE clipping mask."""
    s, z = along_axis(scale, x, axis), along_axis(zp, x, axis).to(x.dtype)
    q = torch.round(x / s) + z
    return (torch.clamp(q, qmin, qmax) - z) * s, (q >= qmin) & (q <= qmax)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (tells -0.0 from 0.0 and compares NaNs by their bits)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int64 if a.element_size() == 8 else torch.int32),
                                              b.view(torch.int64 if b.element_size() == 8 else torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("axis", "qmin", "qmax", "zp_max"),
    [(None, 0, 255, 255), (None, -128, 127, 0), (1, 0, 255, 255), (0, -8, 7, 0), (None, 0, 65535, 65535)],
)
def test_exact_kernel_is_bit_identical_to_the_plain_composition(
    dtype: torch.dtype, axis: int | None, qmin: int, qmax: int, zp_max: int
) -> None:
    """The fused exact kernel (in-place steps, float mask) computes what the plain torch composition computes, bit for
    bit, with and without autograd, gradients included, for the values where an order change would show: NaN, +-inf,
    -0.0 and values that round to -0.0, values far outside the grid, ties."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 6, 9, generator=gen) * 40).to(dtype)
    x[0, 0, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, -1e-3, 1e30, -1e30, 0.5])
    channels = 1 if axis is None else x.shape[axis]
    scale = torch.rand(() if axis is None else (channels,), generator=gen) * 0.5 + 0.05
    zp = torch.randint(0, zp_max + 1, scale.shape, generator=gen, dtype=torch.int32)
    x[1, 1, :3] = torch.tensor([2.5, 3.5, -2.5], dtype=dtype) * scale.reshape(-1)[0].to(dtype)  # ties
    grad = torch.randn(x.shape, generator=gen, dtype=dtype)

    want, mask = plain_fake_quantize(x, scale, zp, qmin, qmax, axis)
    x_fused = x.clone().requires_grad_()
    got = fake_quantize(x_fused, scale, zp, qmin, qmax, axis)
    with torch.no_grad():
        got_no_grad = fake_quantize(x, scale, zp, qmin, qmax, axis)
    assert same_bits(got.detach(), want) and same_bits(got_no_grad, want)
    got.backward(grad)
    assert same_bits(x_fused.grad, grad * mask)


def test_exact_kernel_creates_only_the_output_the_mask_and_the_gradient() -> None:
    """What makes the exact path cheap on a CPU (``_ExactFakeQuantize``): a forward and backward create three tensors
    of the input's size, where the plain composition creates ten (each one a fresh allocation, which costs more than
    the arithmetic on it on a CPU); without autograd, one."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    scale, zp, grad = torch.tensor(0.02), torch.tensor(5, dtype=torch.int32), torch.ones_like(x)
    with FreshTensors(x.numel()) as fresh:
        torch.autograd.grad(fake_quantize(x, scale, zp, 0, 255), x, grad)
    assert len(fresh.ops) == 3, fresh.ops
    with FreshTensors(x.numel()) as fresh, torch.no_grad():
        fake_quantize(x, scale, zp, 0, 255)
    assert len(fresh.ops) == 1, fresh.ops


class FreshTensors(TorchDispatchMode):
    """Records every aten op that returns a new tensor (storage not shared with an input) of ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        self.ops += [str(func) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                     and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs]
        return out


def test_gradient_flows_through_a_disabled_quantizer() -> None:
    fq = fixed(QuantScheme(8))
    x = torch.tensor([100.0, -100.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


# --- repr -----------------------------------------------------------------------------------------------------------
def test_extra_repr_tells_scheme_state_and_qparams() -> None:
    fq = fixed(QuantScheme(8, signed=False, symmetric=False))
    text = repr(fq)
    assert "uint8 affine per-tensor" in text and "uncalibrated" in text and "scale=" not in text
    fq.set_qparams(torch.tensor(0.125), torch.tensor(17))
    fq.enable_quantization(True)
    text = repr(fq)
    assert "uncalibrated" not in text and "calibrated" in text
    assert "scale=0.125" in text and "zero_point=17" in text and "quantize=on" in text and "rounding=exact" in text
    per_channel = with_qparams(QuantScheme(8, per_channel=True), [0.5, 0.25], [0, 0], exact=False)
    text = repr(per_channel)
    assert "per-channel(0)" in text and "scale=[0.25..0.5]" in text and "rounding=fast" in text
