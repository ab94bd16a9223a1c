"""`raytrain.export` on a small ConvTasNet with the real onnxruntime: dynamic shapes, metadata, int8,
the batch-dict `OnnxModel`, TorchScript, and `raytrain infer` on an exported file."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import Tensor, nn

from raytrain.cli import main
from raytrain.export import (
    ExportError,
    OnnxModel,
    export_onnx,
    export_torchscript,
    output_errors,
    quantize_int8,
    real_time_factor,
)
from raytrain.infer import separate_file
from raytrain.models import SeparationModel, build_model

TINY: dict[str, Any] = dict(sample_rate=8000, num_sources=2, enc_kernel_size=16, enc_num_feats=32, msk_num_feats=32,
            msk_num_hidden_feats=64, msk_num_layers=2, msk_num_stacks=1)
EXPORT_TIME = 1001  # not a multiple of the encoder stride (8): the file must hold for every length anyway


def _batches() -> list[dict[str, Tensor]]:
    """Other batch sizes and lengths than the export's, off and on the stride."""
    g = torch.Generator().manual_seed(1)
    return [
        {"mix": torch.randn(3, 1777, generator=g), "lengths": torch.tensor([1777, 1500, 999])},
        {"mix": torch.randn(1, 4000, generator=g)},
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    torch.manual_seed(0)
    model = build_model("convtasnet", TINY).eval()
    folder = tmp_path_factory.mktemp("export")
    fp32 = export_onnx(model, {"mix": torch.randn(2, EXPORT_TIME)}, folder / "model.onnx",
                       metadata={"raytrain.run": "unit/1", "note": "tiny"})
    int8 = quantize_int8(fp32, folder / "model.int8.onnx")
    return model, fp32, int8


def test_onnx_matches_torch_at_other_batch_sizes_and_lengths(exported: tuple[nn.Module, Path, Path]) -> None:
    model, fp32, _ = exported
    onnx_model = OnnxModel(fp32)
    for batch in _batches():
        assert onnx_model(batch)["est_sources"].shape == model(batch)["est_sources"].shape
    assert output_errors(model, onnx_model, _batches())[0] < 1e-4


def test_one_self_contained_file_with_metadata(exported: tuple[nn.Module, Path, Path]) -> None:
    import onnx

    _, fp32, int8 = exported
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.int8.onnx", "model.onnx"]  # no external data, no tmp
    proto = onnx.load_model(str(fp32), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["raytrain.inputs"]) == ["mix"]
    assert json.loads(meta["raytrain.outputs"]) == ["est_sources"]
    assert meta["raytrain.sample_rate"] == "8000"
    assert meta["raytrain.time_multiple"] == "8"
    assert meta["raytrain.run"] == "unit/1" and meta["note"] == "tiny"
    m8 = OnnxModel(int8)
    assert m8.metadata["raytrain.precision"] == "int8" and m8.metadata["note"] == "tiny"
    assert m8.sample_rate == 8000 and m8.eval() is m8


def test_int8_runs_and_stays_close(exported: tuple[nn.Module, Path, Path]) -> None:
    model, _, int8 = exported
    m8 = OnnxModel(int8)
    assert m8(_batches()[0])["est_sources"].shape == (3, 2, 1777)
    # measured 0.010 relative L2 (QUInt8 weights; the field notes saw 1.5% on another model and 13% with QInt8
    # weights on this CPU): 0.05 leaves room for the CPU's rounding and catches a broken quantisation
    assert output_errors(model, m8, _batches())[1] < 0.05


def test_onnx_model_zeroes_beyond_lengths(exported: tuple[nn.Module, Path, Path]) -> None:
    _, fp32, _ = exported
    batch = _batches()[0]
    est = OnnxModel(fp32)(batch)["est_sources"]
    assert est[1, :, 1500:].abs().max() == 0 and est[2, :, 999:].abs().max() == 0
    assert est[1, :, :1500].abs().max() > 0 and est[2, :, :999].abs().max() > 0


def test_torchscript_matches_torch(exported: tuple[nn.Module, Path, Path], tmp_path: Path) -> None:
    model = exported[0]
    path = export_torchscript(model, {"mix": torch.randn(2, EXPORT_TIME)}, tmp_path / "model.ts")
    extra = {"raytrain.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.14 (still works)
        traced: Any = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["raytrain.json"])["raytrain.outputs"] == '["est_sources"]'
    with torch.no_grad():
        for batch in _batches():
            assert (traced(batch["mix"])[0] - model({"mix": batch["mix"]})["est_sources"]).abs().max() < 1e-5


def test_a_model_without_export_spec_is_named(tmp_path: Path) -> None:
    class Plain(nn.Module):
        def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return {"y": batch["x"] * 2}

    with pytest.raises(ExportError, match="model Plain has no export_spec"):
        export_onnx(Plain(), {"x": torch.randn(2, 100)}, tmp_path / "plain.onnx")
    assert not list(tmp_path.iterdir())


def test_a_length_specific_graph_is_refused(tmp_path: Path) -> None:
    """ConvTasNet without its stride as time_multiple: torch.onnx.export alone would fall back to a draft
    export whose file is wrong at other lengths; the export refuses and names the fix."""

    class NoMultiple(SeparationModel):
        @property
        def export_time_multiple(self) -> int:
            return 1

    with pytest.raises(ExportError, match="time_multiple"):
        export_onnx(NoMultiple(**TINY), {"mix": torch.randn(2, 1000)}, tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())


def test_real_time_factor(exported: tuple[nn.Module, Path, Path]) -> None:
    model, fp32, _ = exported
    batches = _batches()[:1]
    for fn in (model, OnnxModel(fp32)):
        rtf = real_time_factor(fn, batches, 8000, repeats=1, warmup=1)
        assert 0 < rtf < 10 and math.isfinite(rtf)


def test_infer_runs_an_onnx_file_like_the_torch_model(exported: tuple[nn.Module, Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model, fp32, _ = exported
    g = np.random.default_rng(0)
    wav = tmp_path / "mix.wav"
    sf.write(str(wav), 0.3 * g.standard_normal(7001).astype(np.float32), 16000)  # resampled to 8 kHz: 3501 samples
    want = separate_file(model, wav, tmp_path / "torch")
    assert main(["infer", str(fp32), str(wav), "-o", str(tmp_path / "onnx")]) == 0
    got = sorted((tmp_path / "onnx").glob("*.wav"))
    assert [p.name for p in got] == [p.name for p in want] == ["mix_s1.wav", "mix_s2.wav"]
    assert capsys.readouterr().out.split() == [str(p) for p in got]
    for a, b in zip(want, got, strict=True):
        x, sr_x = sf.read(str(a), dtype="float32")
        y, sr_y = sf.read(str(b), dtype="float32")
        assert sr_x == sr_y == 16000 and x.shape == y.shape == (7001,)
        assert np.abs(x - y).max() < 1e-3
