"""Pipeline step 5, calibrate: run calibration data through a prepared model with observers on, then freeze qparams.

The observer/quantization switches it uses live in ``mq_core.quant.switches`` (they only touch fake quantizers).

Calibration data follows one rule wherever mq reads it (``mq.calibrate``, ``mq.ptq``, the CLI's ``--calib``):
``iter_batches`` turns the data into a stream of batches, and ``model_inputs`` says which part of a batch is the
model's input and checks it against the example inputs the model was prepared with.

Under ``torch.distributed`` each rank calibrates on its own shard and the observers' statistics are then merged
across the ranks (``sync_observers``, each observer's ``sync``), so every rank freezes the same qparams.

Data is streamed: a batch is read, moved to the model's device, run and dropped; nothing here keeps the data set
(``CalibrationData`` is the re-iterable form that PTQ methods read once per pass).
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mq_core.errors import CalibrationError, ConfigError, MQError, describe_exception
from mq_core.pipeline.prepare import PrepareInfo, prepare_info
from mq_core.quant.switches import enable_calibration, enable_quantization, quantizers, reset_calibration

log = logging.getLogger(__name__)

#: Samples per batch when calibration data is a tensor [N, ...] or a Dataset (the CLI's --batch-size default).
DEFAULT_BATCH_SIZE = 32


def num_inputs(model: nn.Module) -> int | None:
    """Number of positional inputs of a traced model (None when unknown)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return None
    return sum(1 for n in graph.nodes if n.op == "placeholder")


def _count(value: Any, what: str, optional: bool) -> int | None:
    """``value`` as a positive integer option (``num_batches``, ``batch_size``), or a ConfigError saying so."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        allowed = "a positive integer" + (" or None (all)" if optional else "")
        raise ConfigError(f"{what} must be {allowed}, got {value!r}.")
    return int(value)


def _batch_source(data: Any, batch_size: int) -> Iterable[Any]:
    """The batches of ``data`` (see ``iter_batches``), sized where the data says how many there are."""
    if isinstance(data, np.ndarray):
        try:
            data = torch.from_numpy(data)
        except TypeError as exc:
            raise CalibrationError(
                f"calibration data is a numpy array of dtype {data.dtype}, which torch cannot hold ({exc}). Pass a "
                "numeric array [N, ...]."
            ) from None
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise CalibrationError(
                "calibration data is a 0-d tensor (a single number); pass a tensor [N, ...] of N samples, a "
                "Dataset, a DataLoader or a list of batches."
            )
        return data.split(batch_size)
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size)
    if data is None or isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
        got = "None" if data is None else f"a {type(data).__name__}"
        hint = " (for one dict batch pass [batch])" if isinstance(data, Mapping) else ""
        raise CalibrationError(
            f"calibration data must be a tensor [N, ...], a torch Dataset, a DataLoader or an iterable of batches; "
            f"got {got}{hint}."
        )
    return data


def iter_batches(data: Any, num_batches: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Any]:
    """Calibration data as a lazy stream of batches: the one data rule of ``mq.calibrate``, ``mq.ptq`` and the CLI.

    ``data`` may be

    * a tensor (or numpy array) ``[N, ...]``: N samples, split along the first dimension into batches of
      ``batch_size`` (views, the last one may be smaller). A tensor is never a single batch: pass ``[x]`` for that;
    * a ``torch.utils.data.Dataset`` (map-style or iterable): its samples (tensors, ``(input, target)`` tuples or
      dicts), collated into batches of ``batch_size`` by a ``DataLoader`` in order, in this process;
    * any other iterable - a ``DataLoader``, a list or tuple, a generator: each item is one batch, as it is
      (``batch_size`` is not used). So a tuple ``(x, y)`` is two batches; one ``(inputs, target)`` batch is
      ``[(x, y)]``, and inputs with their targets are ``TensorDataset(x, y)``.

    What a batch holds and which part of it is the model's input is ``model_inputs``'s rule. Batches are made one
    at a time as the consumer asks for them, and at most ``num_batches`` are read (all when None): an endless
    loader is fine, and a Dataset reads only the samples it batches. Bad ``data``, ``num_batches`` or
    ``batch_size`` raise here (``CalibrationError``, ``ConfigError``), before anything is read; an exception
    while reading (a Dataset's ``__getitem__``, a generator) becomes a ``CalibrationError`` naming the batch.
    """
    return _stream(data, num_batches, batch_size)[0]


def _stream(data: Any, num_batches: Any, batch_size: Any) -> tuple[Iterator[Any], int | None]:
    """``iter_batches``'s stream and how many batches it will give (None when the data does not say)."""
    limit = _count(num_batches, "num_batches", optional=True)
    source = _batch_source(data, _count(batch_size, "batch_size", optional=False))  # type: ignore[arg-type]
    try:
        total: int | None = len(source)  # type: ignore[arg-type]
    except TypeError:  # a generator, or an IterableDataset without __len__
        total = None
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return _read(iter(source) if limit is None else itertools.islice(iter(source), limit)), total


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (inside tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters (else its buffers) live; the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class CalibrationData:
    """Calibration data as ``mq.calibrate`` reads it (``iter_batches``: a tensor ``[N, ...]`` split into batches, a
    Dataset batched, any other iterable one batch per item), re-iterable: each ``iter()`` reads the data anew, one
    batch at a time, and keeps none of it. This is what a PTQ method's ``apply`` gets; a method that needs several
    passes (bias correction, reconstruction, CLE) iterates it several times, so it never holds the data set.

    With ``device``, each batch is moved there as it is read; with ``check`` (the prepared model), each batch is
    checked against its example inputs as it is read (``model_inputs``), so a bad batch fails with its number
    before a method runs the model on it. ``group`` is the ``torch.distributed`` process group whose ranks each
    hold a shard of the data (a ``DataLoader`` with a ``DistributedSampler``): statistics a method computes over
    the data must be merged over it (``all_reduce``) to be those of the whole data set; None when this process has
    all of it.
    """

    def __init__(self, data: Any, batch_size: int = DEFAULT_BATCH_SIZE, num_batches: int | None = None,
                 device: torch.device | None = None, group: dist.ProcessGroup | None = None,
                 check: nn.Module | None = None) -> None:
        if isinstance(data, Iterator):
            raise CalibrationError("calibration data is a one-shot iterator (a generator?), but it is read more than "
                                   "once; pass a list of batches, a DataLoader or another re-iterable object.")
        iter_batches(data, num_batches, batch_size)  # bad data or options fail now, before any model work
        self.data, self.batch_size, self.num_batches, self.device = data, batch_size, num_batches, device
        self.group, self.check = group, check

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(iter_batches(self.data, self.num_batches, self.batch_size), 1):
            if self.device is not None:
                batch = to_device(batch, self.device)
            if self.check is not None:
                model_inputs(self.check, batch, index=index)
            yield batch

    def on(self, device: torch.device | None) -> CalibrationData:
        """The same data, moved to ``device`` as it is read."""
        return CalibrationData(self.data, self.batch_size, self.num_batches, device, self.group, self.check)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors of a collective over ``group`` must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensors: Sequence[torch.Tensor], op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None
               ) -> list[torch.Tensor]:
    """``tensors`` reduced with ``op`` across the ranks of ``group`` (a collective: every rank calls it with tensors
    of the same shapes and dtypes), each returned on its own device. One collective per tensor, on the device the
    backend needs (``collective_device``), so CUDA tensors under gloo and CPU tensors under NCCL both work."""
    where = collective_device(group)
    out = []
    for tensor in tensors:
        moved = tensor.detach().to(where, copy=True)
        dist.all_reduce(moved, op, group=group)
        out.append(moved.to(tensor.device))
    return out


def _forward_parameters(model: nn.Module) -> tuple[list[str], bool]:
    """Names of the model forward's parameters, in order, and whether it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature: every entry goes to it
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _kind(dtype: torch.dtype) -> str:
    """What must agree between a batch's dtype and the example input's: float dtypes exactly (a float64 batch fails
    in a float32 layer), integers only as integers (token ids of any width index an embedding)."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point or dtype.is_complex:
        return str(dtype)
    return "integer"


def _check_input(position: int, value: Any, spec: dict[str, Any] | None) -> None:
    """One model input against the example input recorded at prepare time (``PrepareInfo.inputs``)."""
    if spec is None:  # the example input was not a tensor: nothing recorded to compare with
        return
    shape, dtype = list(spec["shape"]), getattr(torch, spec["dtype"])
    prepared = f"example input of shape {shape} ({spec['dtype']})"
    if not isinstance(value, torch.Tensor):
        raise CalibrationError(
            f"input {position} of the batch is a {type(value).__name__}, but the model was prepared with an "
            f"{prepared} there. Pass tensors shaped like the example inputs."
        )
    got = list(value.shape)
    dynamic = {int(d): name for d, name in spec.get("dynamic", {0: "batch"}).items()}
    if len(got) != len(shape) or any(g != e for d, (g, e) in enumerate(zip(got, shape)) if d not in dynamic):
        hint = ""
        if got == shape[1:]:
            hint = (" It looks like one sample without its batch dimension: stack samples into batches, or pass a "
                    "Dataset of samples.")
        which = " and ".join(f"{name} (dim {d})" for d, name in sorted(dynamic.items()))
        raise CalibrationError(
            f"input {position} of the batch has shape {got}, but the model was prepared with an {prepared}; only the "
            f"dynamic dimensions may differ: {which}.{hint} Pass data shaped like the example inputs, or prepare "
            "the model with example inputs of your data's shape."
        )
    if _kind(value.dtype) != _kind(dtype):
        raise CalibrationError(
            f"input {position} of the batch is {str(value.dtype).removeprefix('torch.')}, but the model was "
            f"prepared with an {prepared}. Convert the data (e.g. x.to(torch.{spec['dtype']}))."
        )


def model_inputs(
    model: nn.Module, batch: Any, n_inputs: int | None = None, *, index: int | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model's inputs in one batch, as ``(args, kwargs)`` for ``model(*args, **kwargs)``, checked.

    The rule, one for ``mq.calibrate``, ``mq.ptq`` and the CLI, with k the number of example inputs the model was
    prepared with (``n_inputs`` overrides it; for an unprepared traced model it is its number of placeholders):

    * a tensor is the model's only input (a model with k > 1 inputs needs tuples);
    * a tuple or list holds the k inputs first; what follows them (targets, labels) is ignored: ``(x, y)`` runs
      ``model(x)`` for a one-input model;
    * a dict (any Mapping) passes the entries whose keys name parameters of the model's ``forward`` as keyword
      arguments and ignores the others (``{"x": x, "label": y}`` runs ``model(x=x)``); a ``forward(**kwargs)``
      gets every entry.

    For a prepared model every input that was a tensor at prepare time is then checked against that example input:
    the same number of dimensions, the same size in every dimension but the first (the batch dimension, the only
    one that may differ, and with torch.export capture also the sequence dimension of integer inputs:
    ``PrepareInfo.inputs[i]["dynamic"]``), and the same dtype - except that integer inputs
    (token ids) may differ in width. A mismatch raises ``CalibrationError`` naming both shapes, before the model
    runs; with ``index`` the message starts "calibration batch <index>: ".
    """
    try:
        return _model_inputs(model, batch, n_inputs)
    except CalibrationError as exc:
        if index is None:
            raise
        raise CalibrationError(f"calibration batch {index}: {exc}") from None


def _model_inputs(model: nn.Module, batch: Any, n_inputs: int | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    info = getattr(model, "mq_info", None)
    specs = info.inputs if isinstance(info, PrepareInfo) else []
    k = n_inputs if n_inputs is not None else (len(specs) if specs else num_inputs(model) or 1)
    kwargs: dict[str, Any] = {}
    if isinstance(batch, torch.Tensor):
        if k > 1:
            raise CalibrationError(
                f"the model takes {k} inputs, but the batch is a single tensor. Make each batch a tuple "
                f"(input_1, ..., input_{k}[, target])."
            )
        args: tuple[Any, ...] = (batch,)
        positional = args
    elif isinstance(batch, tuple | list):
        if len(batch) < k:
            raise CalibrationError(
                f"the model takes {k} inputs, but the batch is a {type(batch).__name__} of {len(batch)} item(s). "
                f"Make each batch (input_1, ..., input_{k}[, target])."
            )
        args = positional = tuple(batch[:k])
    elif isinstance(batch, Mapping):
        names, var_keyword = _forward_parameters(model)
        kwargs = {key: value for key, value in batch.items() if var_keyword or key in names}
        missing = [name for name in names[:k] if name not in kwargs]
        if missing:
            raise CalibrationError(
                f"a dict batch passes the entries named like the parameters of the model's forward; this one has "
                f"keys {sorted(map(str, batch))} but no {', '.join(map(repr, missing))}. Rename the keys, or make "
                "each batch an (inputs, target) tuple."
            )
        args = ()
        positional = tuple(kwargs[name] for name in names[:k])
    else:
        raise CalibrationError(
            f"a calibration batch must be a tensor, an (inputs..., target) tuple or list, or a dict; got a "
            f"{type(batch).__name__}."
        )
    for position, value in enumerate(positional):
        _check_input(position, value, specs[position] if position < len(specs) else None)
    return args, kwargs


def run_batch(model: nn.Module, batch: Any, n_inputs: int | None = None) -> Any:
    """Call ``model`` on the inputs of one batch (``model_inputs``'s rule and checks)."""
    args, kwargs = model_inputs(model, batch, n_inputs)
    return model(*args, **kwargs)


def calibrate(
    model: nn.Module,
    data: Any = None,
    num_batches: int | None = None,
    progress: bool = True,
    *,
    forward_loop: Callable[[nn.Module], Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    accumulate: bool = False,
    sync: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Run ``data`` through the prepared ``model`` with observers on, then freeze qparams and enable quantization.

    Args:
        data: calibration data (``iter_batches``): a tensor ``[N, ...]`` of samples, a Dataset, a DataLoader, or an
            iterable of batches; each batch a tensor, an ``(inputs, target)`` tuple or a dict (``model_inputs``).
            Streamed: each batch is moved to the model's device as it is read, run and dropped.
        num_batches: stop after this many batches (default: all).
        forward_loop: instead of ``data``, a function that runs the calibration data through the model it is given,
            ``forward_loop(model)`` (as in NVIDIA ModelOpt): mq calls it once with the prepared model, observers on
            and gradients off, and freezes qparams when it returns. It must call the model at least once; each call's
            positional tensor inputs are checked against the example inputs like a batch of ``data``.
        progress: show a tqdm progress bar.
        batch_size: samples per batch when ``data`` is a tensor or a Dataset.
        accumulate: keep the statistics the observers already hold and add this data to them. By default every
            quantizer is reset first, so the result depends on this data only, however often the model was
            calibrated before. Under sync, the statistics already held are counted once: rank 0's are kept (after
            a synced calibration or a restored checkpoint every rank holds the same ones) and the other ranks start
            from scratch, then every rank's new data is merged in.
        sync: when a ``torch.distributed`` process group is initialised (and has more than one rank), merge the
            observers' statistics across the ranks before freezing qparams (``sync_observers``), so that every
            rank ends with the same qparams, those of one process calibrating on the union of the ranks' data (see
            docs/algorithms.md for what each observer merges). Every rank of the group must call ``calibrate``.
            ``False`` keeps each rank's qparams its own.
        process_group: the group to synchronise over (default: the world).

    Errors raise ``MQError`` subclasses. When the arguments or the first batch are bad (wrong shape, empty data),
    the model is left as it was; when calibration fails later (a later batch, the model raising, Ctrl-C), every
    quantizer is reset and switched off, so no statistics of a partial pass survive into the next calibration.
    Under sync, a rank that fails tells the others, which then fail too (``CalibrationError``) instead of waiting
    for it.
    """
    if isinstance(model, DistributedDataParallel):
        raise ConfigError(
            "calibrate() got a model wrapped in DistributedDataParallel. Calibrate the prepared model on every rank "
            "first (calibration sizes the qparams and learnable quantizer parameters, which DDP registers when it is "
            "built), then wrap it: DistributedDataParallel(mq.calibrate(qmodel, data))."
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"calibrate() needs the prepared model (an nn.Module), got {type(model).__name__}.")
    prepare_info(model)
    if forward_loop is not None:
        if data is not None or num_batches is not None:
            raise ConfigError("calibrate() got both a forward_loop and data (or num_batches); pass one source of "
                              "calibration: the data, or a forward_loop that runs it through the model.")
        if not callable(forward_loop):
            raise ConfigError(f"forward_loop must be a function taking the model, got {type(forward_loop).__name__}.")
    for name, flag in (("accumulate", accumulate), ("sync", sync)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}.")
    group = sync_group(sync, process_group)
    agreement = RankAgreement(group)
    try:
        if forward_loop is not None:
            return _calibrate_with(model, lambda: _run_loop(model, forward_loop), accumulate, group, agreement)
        return _calibrate(model, data, num_batches, progress, batch_size, accumulate, group, agreement)
    except BaseException:
        agreement.fail()
        raise


def sync_group(sync: bool, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to merge statistics over (``calibrate``'s and ``ptq``'s ``sync``/``process_group``): None when not
    syncing (off, no process group, one rank)."""
    if not isinstance(sync, bool):
        raise ConfigError(f"sync must be True or False, got {sync!r}.")
    if not sync or not dist.is_available() or not dist.is_initialized():
        if process_group is not None and sync:
            raise ConfigError("got a process_group, but torch.distributed is not initialised; call "
                              "torch.distributed.init_process_group first (or pass no process_group).")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class RankAgreement:
    """The one all-reduce by which the ranks of a synced calibration learn whether every rank got through its own
    pass: each rank takes part exactly once, when its pass is done (``confirm``) or when it failed (``fail``), so a
    rank that fails (empty shard, bad batch, the model raising) makes the others fail instead of leaving them
    waiting in the merge."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.done = group is None

    def confirm(self) -> None:
        """This rank's pass succeeded; raise ``CalibrationError`` if another rank's did not."""
        if self.done:
            return
        self.done = True
        if not self._all(True):
            raise CalibrationError("calibration (or a PTQ method's data check) failed on another rank (see its "
                                   "log), so the statistics cannot be merged; this rank stops here too.")

    def fail(self) -> None:
        """This rank failed: tell the others (its own error stays the one raised, whatever happens here)."""
        if self.done:
            return
        self.done = True
        try:
            self._all(False)
        except Exception:
            log.exception("could not tell the other ranks that calibration failed here")

    def _all(self, ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        return bool(all_reduce([flag], dist.ReduceOp.MIN, self.group)[0].item())


def sync_observers(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Merge the statistics of every observing quantizer's observer across the ranks of ``group``
    (``Observer.sync``), so that the qparams frozen next are the same on every rank.

    A collective: every rank calls it on the same prepared model (the same quantizers, observing the same way).
    """
    for fq in quantizers(model).values():
        if fq.observe_enabled.item() and fq.observer is not None:
            fq.observer.sync(group)


def _calibrate(model: nn.Module, data: Any, num_batches: int | None, progress: bool, batch_size: int,
               accumulate: bool, group: dist.ProcessGroup | None, agreement: RankAgreement) -> nn.Module:
    """``calibrate`` after its argument checks; ``group`` is where to sync (None: not at all)."""
    stream, total = _stream(data, num_batches, batch_size)
    device = model_device(model)
    stream = (to_device(batch, device) for batch in stream)  # each batch where the model is, as it is read
    first = next(stream, None)
    if first is None:
        raise CalibrationError(
            "calibration data is empty: no batch was produced. Pass a non-empty DataLoader, Dataset, tensor [N, ...] "
            "or list of batches (a few hundred representative samples are usually enough)."
        )
    model_inputs(model, first, index=1)  # a bad first batch leaves the model as it was
    return _calibrate_with(model, lambda: _run_batches(model, itertools.chain([first], stream), total, progress),
                           accumulate, group, agreement)


def _run_batches(model: nn.Module, batches: Iterator[Any], total: int | None, progress: bool) -> int:
    """Every batch through ``model`` (observers on); the number of batches."""
    seen = 0
    for seen, batch in enumerate(tqdm(batches, total=total, desc="calibrate", unit="batch", disable=not progress,
                                      leave=False), 1):
        args, kwargs = model_inputs(model, batch, index=seen)
        try:
            model(*args, **kwargs)
        except MQError:
            raise
        except Exception as exc:
            raise CalibrationError(
                f"the model raised {type(exc).__name__} on calibration batch {seen}: {exc}. Check that the "
                "float model runs on that batch."
            ) from exc
    return seen


def _run_loop(model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> int:
    """``forward_loop(model)``, each call's tensor inputs checked like a batch; the number of calls."""
    info = prepare_info(model)
    calls = 0

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal calls
        calls += 1
        for position, value in enumerate(args[: len(info.inputs)]):
            try:
                _check_input(position, value, info.inputs[position])
            except CalibrationError as exc:
                raise CalibrationError(f"forward_loop's call {calls} of the model: {exc}") from None

    handle = model.register_forward_pre_hook(check)
    try:
        forward_loop(model)
    except MQError:
        raise
    except Exception as exc:
        raise CalibrationError(f"forward_loop raised {describe_exception(exc)} (after {calls} call(s) of the model). "
                               "Check that it runs on the prepared model it is given.") from exc
    finally:
        handle.remove()
    if calls == 0:
        raise CalibrationError("forward_loop returned without calling the model it was given, so no observer saw "
                               "any data; it must call model(batch) on the calibration batches.")
    return calls


def _calibrate_with(model: nn.Module, run: Callable[[], int], accumulate: bool, group: dist.ProcessGroup | None,
                    agreement: RankAgreement) -> nn.Module:
    """Observers on, ``run()`` the data through the model without gradients, merge across ranks, freeze."""
    was_training = model.training
    try:
        if not accumulate or (group is not None and dist.get_rank(group) != 0):
            reset_calibration(model)
        enable_calibration(model)
        model.eval()
        with torch.no_grad():
            seen = run()
        model.train(was_training)
        log.info("calibrated on %d batches", seen)
        if group is not None:
            agreement.confirm()
            sync_observers(model, group)
            log.info("merged observer statistics across %d ranks", dist.get_world_size(group))
        enable_quantization(model)
    except BaseException:
        model.train(was_training)
        reset_calibration(model)
        raise
    return model


def _read(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, with an error while reading the data (a Dataset's ``__getitem__``, a generator) turned into a
    CalibrationError that names the batch."""
    for index in itertools.count(1):
        try:
            batch = next(batches)
        except StopIteration:
            return
        except MQError:
            raise
        except Exception as exc:
            raise CalibrationError(
                f"reading calibration batch {index} failed: {describe_exception(exc)}. Fix the data source "
                "(Dataset, DataLoader or generator)."
            ) from exc
        yield batch

