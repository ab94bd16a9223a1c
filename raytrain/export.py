"""Export batch-dict models to ONNX (and TorchScript), quantise to int8, and run or time the result.

The export contract: a model that can be exported has an ``export_spec`` attribute (an
:class:`ExportSpec`): which batch keys go in, positionally, each ``(batch, time)`` or
``(batch, time, ...)``, and which output keys come out. The exported graph takes those
inputs as plain tensors and returns those outputs; everything else a batch carries
(``lengths``, targets) stays outside it. :class:`OnnxModel` puts the batch-dict interface
back on top, so an exported file is used where the torch model was: metrics, inference.

Shapes: batch (axis 0) and every input's time axis are dynamic. A model whose graph only
holds for time lengths that are a multiple of ``time_multiple`` (ConvTasNet: its encoder
stride, or the torch code pads by a data-dependent amount and the graph bakes that branch)
is exported for those lengths; :class:`OnnxModel` zero-pads inputs up to the multiple and
trims the time-aligned outputs back, which is what the torch model does inside, so results
match torch at every length. The file records it in its metadata (``raytrain.time_multiple``)
for other runtimes.

No Ray here. ``onnx``/``onnxruntime``/``onnxscript`` are imported where used, so importing this
module (the models do, for :class:`ExportSpec`) costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.logs import quiet_logger

META_PREFIX = "raytrain."


class ExportError(RuntimeError):
    """A model cannot be exported, or its exported graph does not reproduce torch."""


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph takes and returns.

    ``inputs``: batch keys fed positionally, each ``(batch, time)`` or ``(batch, time, ...)``; the first
    is the audio (its time is what real-time factors count).
    ``untimed``: those of the inputs that have no time axis, only a dynamic batch axis (a row's length,
    a speaker embedding).
    ``outputs``: output keys returned, in this order.
    ``time_axes``: the time axis of an input (default 1 for inputs not named) and of each
    output aligned sample for sample with the inputs' time (those are trimmed back after
    padding and zeroed beyond ``batch["lengths"]``); outputs not named have no such axis.
    ``time_multiple``: the graph takes time lengths that are multiples of this (see the module
    docstring); callers zero-pad to it.
    ``min_time``: the shortest first input (time steps) the graph holds for (a centred STFT's reflect
    padding needs more samples than half its window).
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    time_axes: dict[str, int] = field(default_factory=dict)
    time_multiple: int = 1
    untimed: tuple[str, ...] = ()
    min_time: int = 1

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise ValueError("ExportSpec needs at least one input and one output")
        stray = [n for n in self.untimed if n not in self.inputs]
        if stray:
            raise ValueError(f"ExportSpec.untimed names {stray}, which are not inputs {list(self.inputs)}")
        if self.inputs[0] in self.untimed:
            raise ValueError(f"ExportSpec: the first input ({self.inputs[0]!r}) is the audio and needs a time axis")
        if self.time_multiple < 1:
            raise ValueError(f"ExportSpec.time_multiple must be >= 1, got {self.time_multiple}")
        for name, axis in self.time_axes.items():
            if axis < 1:
                raise ValueError(f"ExportSpec.time_axes[{name!r}] = {axis}: axis 0 is the batch")

    def time_axis(self, name: str) -> int | None:
        """The time axis of input or output ``name`` (inputs default to 1; None: none)."""
        if name in self.untimed:
            return None
        if name in self.time_axes:
            return self.time_axes[name]
        return 1 if name in self.inputs else None

    def metadata(self) -> dict[str, str]:
        return {
            f"{META_PREFIX}inputs": json.dumps(list(self.inputs)),
            f"{META_PREFIX}outputs": json.dumps(list(self.outputs)),
            f"{META_PREFIX}time_axes": json.dumps(self.time_axes, sort_keys=True),
            f"{META_PREFIX}time_multiple": str(self.time_multiple),
            f"{META_PREFIX}untimed": json.dumps(list(self.untimed)),
            f"{META_PREFIX}min_time": str(self.min_time),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], inputs: Sequence[str], outputs: Sequence[str]) -> ExportSpec:
        """The spec a file's metadata records; ``inputs``/``outputs`` (the graph's names) fill what it lacks."""
        def names(key: str, graph: Sequence[str]) -> tuple[str, ...]:
            return tuple(json.loads(meta[key])) if key in meta else tuple(graph)

        return cls(
            inputs=names(f"{META_PREFIX}inputs", inputs),
            outputs=names(f"{META_PREFIX}outputs", outputs),
            time_axes={str(k): int(v) for k, v in json.loads(meta.get(f"{META_PREFIX}time_axes", "{}")).items()},
            time_multiple=int(meta.get(f"{META_PREFIX}time_multiple", "1")),
            untimed=tuple(json.loads(meta.get(f"{META_PREFIX}untimed", "[]"))),
            min_time=int(meta.get(f"{META_PREFIX}min_time", "1")),
        )


def export_spec(model: Any) -> ExportSpec:
    """``model.export_spec``, or an :class:`ExportError` that says what is missing."""
    spec = getattr(model, "export_spec", None)
    if spec is None:
        raise ExportError(
            f"model {type(model).__name__} has no export_spec; define `export_spec` (a raytrain.export.ExportSpec: "
            "the batch keys it takes and the output keys it returns) to export it"
        )
    if not isinstance(spec, ExportSpec):
        raise ExportError(f"model {type(model).__name__}: export_spec must be a raytrain.export.ExportSpec, "
                          f"got {type(spec).__name__}")
    return spec


def graph_forward(model: Any) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """What the exported graph computes: ``model.export_forward`` when the model has one (its forward does
    more than the graph can hold, e.g. a Griffin-Lim vocoder after the network), else the model itself."""
    return getattr(model, "export_forward", model)


def finish_exported(model: Any, out: dict[str, Tensor], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An exported graph's outputs completed as the torch model's forward returns them: through
    ``model.export_finish(out, batch)`` when the model has one (the vocoder, lengths), else as they are."""
    finish = getattr(model, "export_finish", None)
    return out if finish is None else finish(out, batch)


class _Positional(nn.Module):
    """The spec's inputs in, positionally; the spec's outputs out, as a tuple."""

    def __init__(self, model: nn.Module, spec: ExportSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = graph_forward(self.model)(dict(zip(self.spec.inputs, inputs, strict=True)))
        missing = [k for k in self.spec.outputs if k not in out]
        if missing:
            raise ExportError(f"model {type(self.model).__name__} returned {sorted(out)}, "
                              f"not the export_spec outputs {missing}")
        return tuple(out[k] for k in self.spec.outputs)


def _pad_time(x: Tensor, axis: int, multiple: int) -> Tensor:
    """Zero-pad ``x`` along ``axis`` up to a multiple of ``multiple``."""
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - axis) + [0, extra]
    return F.pad(x, pad)


def _example_inputs(spec: ExportSpec, batch: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    """The spec's inputs from ``batch``, time padded to the multiple and at least 2 rows (a batch of 1
    would be specialised to 1 by torch.export)."""
    missing = [k for k in spec.inputs if k not in batch]
    if missing:
        raise ExportError(f"example batch lacks the export_spec inputs {missing} (it has {sorted(batch)})")
    xs = []
    for name in spec.inputs:
        x = batch[name].detach().cpu()
        axis = spec.time_axis(name)
        if axis is None:
            if x.ndim < 1:
                raise ExportError(f"example input {name!r} is a scalar: expected (batch, ...)")
        elif x.ndim <= axis:
            raise ExportError(f"example input {name!r} has shape {tuple(x.shape)}: expected (batch, time, ...)")
        else:
            x = _pad_time(x, axis, spec.time_multiple)
        if x.shape[0] == 1:
            x = torch.cat([x, x])
        xs.append(x)
    return tuple(xs)


CHECK_STEPS = 4096  # the parity check's inputs are at most about this long: a few forward passes, not the batch's


def _check_cases(spec: ExportSpec, xs: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
    """Two small input shapes for the parity check: the example's first 2 rows cut to at most ~CHECK_STEPS
    steps, and that with one more row and one more time multiple."""
    base = []
    for name, x in zip(spec.inputs, xs, strict=True):
        axis = spec.time_axis(name)
        if axis is None:
            base.append(x[:2])
            continue
        steps = min(x.shape[axis], max(spec.time_multiple, CHECK_STEPS // spec.time_multiple * spec.time_multiple))
        base.append(x[:2].narrow(axis, 0, steps))
    return [tuple(base), _variant(spec, tuple(base))]


def _variant(spec: ExportSpec, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Another shape of the same inputs (one more row, one more time step multiple) to check a graph
    really is dynamic."""
    out = []
    for name, x in zip(spec.inputs, xs, strict=True):
        axis = spec.time_axis(name)
        if axis is None:
            out.append(torch.cat([x, x[:1]]))
            continue
        y = torch.cat([x, x[:1].flip(axis)])
        tail = y.narrow(axis, 0, spec.time_multiple).flip(axis)
        out.append(torch.cat([y, tail], dim=axis))
    return tuple(out)


def _dim_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _dynamic_shapes(spec: ExportSpec) -> tuple[tuple[dict[int, Any], ...]]:
    batch = torch.export.Dim("batch")
    shapes = []
    for i, name in enumerate(spec.inputs):
        axis = spec.time_axis(name)
        if axis is None:
            shapes.append({0: batch})
            continue
        if i == 0 and spec.min_time > 1 and spec.time_multiple == 1:
            # A bounded length: guards the bound implies but sympy cannot prove (a centred STFT's frame count
            # is never 1) are kept as checks rather than refused; the parity check runs other lengths.
            shapes.append({0: batch, axis: torch.export.Dim.DYNAMIC(min=spec.min_time)})
            continue
        bounds = {"min": -(-spec.min_time // spec.time_multiple)} if i == 0 and spec.min_time > 1 else {}
        steps = torch.export.Dim(f"time_{_dim_name(name)}" if spec.time_multiple == 1
                                 else f"time_{_dim_name(name)}_div{spec.time_multiple}", **bounds)
        shapes.append({0: batch, axis: steps if spec.time_multiple == 1 else spec.time_multiple * steps})
    return (tuple(shapes),)  # forward(*inputs): one entry, the tuple of inputs


def _metadata(model: nn.Module, spec: ExportSpec, extra: Mapping[str, str] | None, fmt: str) -> dict[str, str]:
    meta = spec.metadata()
    meta[f"{META_PREFIX}model"] = type(model).__name__
    meta[f"{META_PREFIX}format"] = fmt
    sample_rate = getattr(model, "sample_rate", None)
    if sample_rate is not None:
        meta[f"{META_PREFIX}sample_rate"] = str(int(sample_rate))
    own = getattr(model, "export_metadata", None)  # what a runtime needs beyond the graph (a vocoder's sizes)
    if own is not None:
        meta.update({f"{META_PREFIX}{k}": str(v) for k, v in own().items()})
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is written by raytrain.export itself")
        meta[str(k)] = str(v)
    return meta


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it on success and is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tolerance_ok(diff: float, ref: Sequence[Tensor], rel: float) -> bool:
    scale = max([1.0, *(float(r.abs().max()) for r in ref if r.numel())])
    return diff <= rel * scale


def _check(what: str, run: Callable[[tuple[Tensor, ...]], Sequence[Tensor]], wrapper: nn.Module,
           cases: Sequence[tuple[Tensor, ...]], rel: float) -> None:
    with torch.no_grad():
        for xs in cases:
            ref = wrapper(*xs)
            try:
                got = run(xs)
            except Exception as exc:  # the runtime's own error, with the shapes
                raise ExportError(f"{what}: the exported graph fails on input shapes "
                                  f"{[tuple(x.shape) for x in xs]}: {exc}") from exc
            diff = max(float((torch.as_tensor(g) - r).abs().max()) if r.numel() else 0.0
                       for g, r in zip(got, ref, strict=True))
            if not _tolerance_ok(diff, ref, rel):
                raise ExportError(f"{what}: the exported graph differs from torch by {diff:.3g} on input shapes "
                                  f"{[tuple(x.shape) for x in xs]} (a length- or batch-specific trace?)")


def _torch_export(wrapper: _Positional, spec: ExportSpec, xs: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export.export`` with dynamic batch and time. Run here rather than inside ``torch.onnx.export``:
    that one falls back to a draft export when the shapes do not hold for every length, and the graph it then
    writes silently holds for the example's length only."""
    try:
        return torch.export.export(wrapper, xs, dynamic_shapes=_dynamic_shapes(spec), strict=False)
    except torch._dynamo.exc.UserError as exc:  # constraint violations: the graph is length-specific
        raise ExportError(
            f"model {type(wrapper.model).__name__}: torch.export cannot make batch and time dynamic: {exc}\n"
            "If the model needs time lengths that are a multiple of N (a strided encoder), set "
            "export_spec.time_multiple = N."
        ) from exc


def export_onnx(
    model: nn.Module,
    example_batch: Mapping[str, Tensor],
    path: str | Path,
    *,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
    check: bool = True,
    check_tolerance: float = 1e-3,
) -> Path:
    """Write ``model`` as one self-contained ONNX file at ``path`` (atomically); returns the path.

    Batch (axis 0) and each input's time axis are dynamic (``torch.export.Dim``). The file's
    ``metadata_props`` hold ``raytrain.inputs``/``raytrain.outputs`` (JSON lists), ``raytrain.time_axes``,
    ``raytrain.time_multiple``, ``raytrain.sample_rate`` (when the model has one), ``raytrain.model``
    and ``metadata``. With ``check``, onnxruntime runs the file on the example's first rows (cut to
    ~``CHECK_STEPS``) and on one more row and time multiple, and an output off torch's by more than
    ``check_tolerance`` x max(1, max |torch output|) raises :class:`ExportError`.
    """
    import onnx

    spec = export_spec(model)
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        wrapper = _Positional(model, spec).eval()
        xs = _example_inputs(spec, example_batch)
        ep = _torch_export(wrapper, spec, xs)
        kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
        # The exporter's registry logs a warning per torchvision op when torchvision is not installed: no model
        # here uses one.
        with warnings.catch_warnings(), quiet_logger("torch.onnx._internal.exporter._registration"):
            warnings.simplefilter("ignore", UserWarning)
            program = torch.onnx.export(ep, (), input_names=list(spec.inputs), output_names=list(spec.outputs),
                                        dynamo=True, external_data=False, optimize=True, verbose=False, **kwargs)
        assert program is not None
        proto = program.model_proto
        meta = {p.key: p.value for p in proto.metadata_props}
        meta.update(_metadata(model, spec, metadata, "onnx"))
        onnx.helper.set_model_props(proto, meta)
        with _atomic(path) as tmp:
            try:
                onnx.save_model(proto, str(tmp), save_as_external_data=False)
            except ValueError as exc:  # protobuf's 2 GB limit
                raise ExportError(f"{path}: the model does not fit in one ONNX file ({exc})") from exc
            if check:
                session = _session(tmp, threads=1)

                def run(ins: tuple[Tensor, ...]) -> Sequence[Tensor]:
                    feeds = {n: x.numpy() for n, x in zip(spec.inputs, ins, strict=True)}
                    return [torch.from_numpy(np.asarray(o)) for o in session.run(list(spec.outputs), feeds)]

                _check(path.name, run, wrapper, _check_cases(spec, xs), check_tolerance)
    finally:
        model.train(was_training)
    return path


def _pad_to(x: Tensor, axis: int, multiple: int) -> Tensor:
    """Zero-pad ``x`` along ``axis`` up to a multiple of ``multiple`` (scripted, so a trace keeps it dynamic)."""
    extra = (multiple - x.size(axis) % multiple) % multiple
    shape = list(x.shape)  # a new tensor even when extra == 0: a trace maps a returned input to the output
    shape[axis] = extra
    return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=axis)


def _trim_like(y: Tensor, axis: int, like: Tensor, like_axis: int) -> Tensor:
    """``y`` cut along ``axis`` to ``like``'s length on ``like_axis`` (scripted, as `_pad_to`)."""
    return y.narrow(axis, 0, like.size(like_axis))


class _PaddedPositional(nn.Module):
    """:class:`_Positional` that zero-pads its time axes to the multiple and trims time-aligned outputs
    back, through scripted helpers so that a trace keeps both dynamic."""

    def __init__(self, inner: _Positional) -> None:
        super().__init__()
        self.inner = inner
        self.spec = inner.spec
        self.pad = torch.jit.script(_pad_to)
        self.trim = torch.jit.script(_trim_like)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        spec = self.spec
        axes = [spec.time_axis(n) for n in spec.inputs]
        outs = self.inner(*(x if a is None else self.pad(x, a, spec.time_multiple)
                            for x, a in zip(inputs, axes, strict=True)))
        first = axes[0]
        assert first is not None  # ExportSpec: the first input is timed
        return tuple(y if (axis := spec.time_axis(name)) is None else self.trim(y, axis, inputs[0], first)
                     for name, y in zip(spec.outputs, outs, strict=True))


def export_torchscript(
    model: nn.Module,
    example_batch: Mapping[str, Tensor],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    check: bool = True,
    check_tolerance: float = 1e-4,
) -> Path:
    """Write ``model`` as a traced TorchScript module at ``path`` (atomically); returns the path.

    The module takes the spec's inputs positionally, at any time length (it zero-pads to
    ``time_multiple`` itself and trims the time-aligned outputs back), and returns the spec's
    outputs as a tuple. The metadata :func:`export_onnx` writes is in the archive's extra file
    ``raytrain.json`` (``torch.jit.load(path, _extra_files={"raytrain.json": ""})``). ``torch.jit.trace``
    is deprecated in torch 2.14 but works; its warnings are silenced here, and ``check`` runs the
    traced module at another batch size and length against torch (:class:`ExportError` when off).
    """
    spec = export_spec(model)
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        inner = _Positional(model, spec).eval()
        cases = _check_cases(spec, _example_inputs(spec, example_batch))  # a trace's cost grows with the input
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.14; tracer warnings are checked below
            try:
                wrapper = _PaddedPositional(inner).eval()
                traced = torch.jit.trace(wrapper, cases[0], check_trace=False)
            except Exception as exc:
                raise ExportError(f"model {type(model).__name__}: torch.jit.trace failed: {exc}") from exc
        meta = _metadata(model, spec, metadata, "torchscript")
        if check:
            def run(ins: tuple[Tensor, ...]) -> Sequence[Tensor]:
                return list(traced(*ins))

            _check(path.name, run, inner, cases, check_tolerance)
            if spec.time_multiple > 1:  # a length off the multiple: the module pads inside, as its eager self does
                odd = tuple(x if a is None else x.narrow(a, 0, x.shape[a] - 1) for x, a in
                            ((x, spec.time_axis(n)) for n, x in zip(spec.inputs, cases[1], strict=True)))
                _check(path.name, run, wrapper, [odd], check_tolerance)
        with _atomic(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated in torch 2.14
            torch.jit.save(traced, str(tmp), _extra_files={"raytrain.json": json.dumps(meta, sort_keys=True)})
    finally:
        model.train(was_training)
    return path


def _read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


class _DropPreprocessHint(logging.Filter):
    """quantize_dynamic logs a hint to run its pre-processing on every call (here it changes nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(src: str | Path, dst: str | Path, *, metadata: Mapping[str, str] | None = None,
                  op_types: Sequence[str] | None = None) -> Path:
    """Dynamically quantise the ONNX file ``src`` to int8 weights at ``dst`` (atomically); returns ``dst``.

    ``onnxruntime.quantization.quantize_dynamic`` with ``QUInt8`` weights: on an AVX2 CPU without VNNI,
    ``QInt8`` weights lost far more accuracy (13% relative error against 1.5%). ``src``'s metadata is
    kept, with ``raytrain.precision = int8`` and ``metadata`` added. ``op_types``: the ONNX op types to
    quantise (default: every type onnxruntime can); a front end whose constant matrix feeds a log (a mel
    filterbank's MatMul) loses far too much as int8, so a model with one lists its network's ops (Conv, Gemm).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    meta = _read_metadata(src)
    meta[f"{META_PREFIX}precision"] = "int8"
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    with _atomic(dst) as tmp:
        quantized = tmp.with_name(tmp.name + ".q")
        quiet = _DropPreprocessHint()
        logging.getLogger().addFilter(quiet)
        try:
            quantize_dynamic(str(src), str(quantized), weight_type=QuantType.QUInt8,
                             op_types_to_quantize=None if op_types is None else list(op_types))
            proto = onnx.load_model(str(quantized))
        finally:
            logging.getLogger().removeFilter(quiet)
            quantized.unlink(missing_ok=True)
        onnx.helper.set_model_props(proto, meta)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return dst


def _session(path: str | Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OnnxModel:
    """An exported ONNX file with the batch-dict interface of the torch model it came from.

    ``model(batch)`` feeds the spec's inputs (zero-padded to ``time_multiple``), trims the
    time-aligned outputs back to the input length and zeroes them beyond ``batch["lengths"]``,
    as the torch separation models do, and returns ``{output key: Tensor}``. ``sample_rate``,
    ``export_spec`` and ``metadata`` come from the file. onnxruntime on the CPU with
    ``intra_op_num_threads`` threads.
    """

    def __init__(self, path: str | Path, *, intra_op_num_threads: int = 1) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        self.session = _session(self.path, intra_op_num_threads)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.export_spec = ExportSpec.from_metadata(
            self.metadata, list(graph_inputs), [o.name for o in self.session.get_outputs()])
        self._dtypes = {n: _ORT_DTYPES.get(graph_inputs[n].type, np.float32) for n in self.export_spec.inputs}
        rate = self.metadata.get(f"{META_PREFIX}sample_rate")
        self.sample_rate: int | None = None if rate is None else int(rate)
        self.training = False

    def eval(self) -> OnnxModel:
        return self

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, inputs={self.export_spec.inputs}, outputs={self.export_spec.outputs})"

    def __call__(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from raytrain.models.separation import zero_beyond

        spec = self.export_spec
        missing = [k for k in spec.inputs if k not in batch]
        if missing:
            raise KeyError(f"{self.path.name} takes the batch keys {list(spec.inputs)}; the batch lacks {missing}")
        feeds: dict[str, np.ndarray] = {}
        time_len: int | None = None
        for name in spec.inputs:
            x = batch[name].detach().cpu()
            in_axis = spec.time_axis(name)
            if in_axis is not None:
                if time_len is None:
                    time_len = x.shape[in_axis]
                    if time_len < spec.min_time:
                        raise ValueError(f"{self.path.name}: input {name!r} has {time_len} time steps; the graph "
                                         f"needs at least {spec.min_time}")
                x = _pad_time(x, in_axis, spec.time_multiple)
            feeds[name] = x.numpy().astype(self._dtypes[name], copy=False)
        results = self.session.run(list(spec.outputs), feeds)
        lengths = batch.get("lengths")
        out: dict[str, Tensor] = {}
        for name, arr in zip(spec.outputs, results, strict=True):
            y = torch.from_numpy(np.asarray(arr))
            axis = spec.time_axis(name)
            if axis is not None:
                assert time_len is not None
                y = y.narrow(axis, 0, min(time_len, y.shape[axis]))
                if lengths is not None:
                    y = zero_beyond(y.movedim(axis, -1), lengths).movedim(-1, axis)
            out[name] = y
        return out


def output_errors(torch_model: nn.Module, other: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
                  batches: Sequence[dict[str, Tensor]]) -> tuple[float, float]:
    """(max abs difference, relative error) of ``other``'s outputs against ``torch_model``'s (eval mode, no
    grad) over ``batches``, on the torch model's ``export_spec`` outputs (else the keys both return). The
    relative error ``||other - torch|| / ||torch||`` (L2 over every output value of every batch) is the
    scale-free figure for int8, where the max abs difference depends on the signal level."""
    spec = getattr(torch_model, "export_spec", None)
    was_training = torch_model.training
    torch_model.eval()
    worst = num = den = 0.0
    try:
        with torch.no_grad():
            for batch in batches:
                ref, got = graph_forward(torch_model)(batch), other(batch)
                keys = list(spec.outputs) if isinstance(spec, ExportSpec) else [k for k in ref if k in got]
                if not keys:
                    raise ValueError(f"no output key in common: torch {sorted(ref)}, other {sorted(got)}")
                for k in keys:
                    r, g = ref[k].detach().cpu().double(), torch.as_tensor(got[k]).cpu().double()
                    if r.shape != g.shape:
                        raise ValueError(f"output {k!r}: torch shape {tuple(r.shape)}, other {tuple(g.shape)}")
                    if r.numel():
                        worst = max(worst, float((r.float() - g.float()).abs().max()))
                    num += float(((g - r) ** 2).sum())
                    den += float((r ** 2).sum())
    finally:
        torch_model.train(was_training)
    return worst, ((num / den) ** 0.5 if den > 0 else float(num > 0) * float("inf"))


def _audio_seconds(fn: Any, batch: Mapping[str, Tensor], sample_rate: float) -> float:
    spec = getattr(fn, "export_spec", None)
    if spec is None:  # a bound method (a model's export_forward): its model's spec
        spec = getattr(getattr(fn, "__self__", None), "export_spec", None)
    if isinstance(spec, ExportSpec):
        key, axis = spec.inputs[0], spec.time_axis(spec.inputs[0]) or 1
    elif "mix" in batch:
        key, axis = "mix", 1
    else:
        raise ValueError(f"{type(fn).__name__} has no export_spec: cannot tell which batch key is the audio")
    x = batch[key]
    lengths = batch.get("lengths")
    samples = float(lengths.sum()) if lengths is not None else float(x.shape[0] * x.shape[axis])
    return samples / float(sample_rate)


def real_time_factor(
    fn: Callable[[dict[str, Tensor]], Any],
    batches: Sequence[dict[str, Tensor]],
    sample_rate: float,
    *,
    repeats: int = 1,
    warmup: int = 1,
) -> float:
    """Processing seconds per second of audio for ``fn(batch)`` over ``batches`` (``time.perf_counter``;
    ``warmup`` untimed passes first, then ``repeats`` timed ones; torch under ``no_grad``). Audio seconds
    come from the first ``export_spec`` input's time axis (``mix`` when ``fn`` has no spec), counting
    ``lengths`` when the batch has them. Thread counts are the caller's (``torch.set_num_threads``,
    ``OnnxModel(intra_op_num_threads=...)``)."""
    if not batches:
        raise ValueError("real_time_factor needs at least one batch")
    audio = sum(_audio_seconds(fn, b, sample_rate) for b in batches) * repeats
    with torch.no_grad():
        for _ in range(warmup):
            for b in batches:
                fn(b)
        start = time.perf_counter()
        for _ in range(repeats):
            for b in batches:
                fn(b)
        spent = time.perf_counter() - start
    return spent / audio
