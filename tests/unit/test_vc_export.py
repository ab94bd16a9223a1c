"""A vc_flow sampler exported to ONNX with the real onnxruntime: inputs without a time axis (lengths, the
speaker embedding and the reference's statistics), a noise input fitted to the source's frames inside the
graph, the vocoder outside it, int8, and `raytrain infer` on the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import Tensor

from raytrain.cli import main
from raytrain.export import ExportSpec, OnnxModel, export_onnx, finish_exported, output_errors, quantize_int8
from raytrain.models.vc import VCFlow, reference_stats

SR = 16000
ARGS = dict(hidden=24, layers=2, kernel=5, dilations=[1, 2], content_hidden=24, content_layers=1, content_dim=8,
            sample_steps=2, griffin_lim_iters=4, reference_stats=True)


def _batch(rows: int, time: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([time - 1777 * i for i in range(rows)])
    audio = 0.1 * torch.randn(rows, time, generator=g) * (torch.arange(time)[None] < lengths[:, None])
    return {"audio": audio, "lengths": lengths,
            "ref_emb": torch.nn.functional.normalize(torch.randn(rows, 256, generator=g), dim=-1),
            "ref_stats": reference_stats(0.1 * torch.randn(rows, 8000, generator=g)),
            "noise": torch.randn(rows, time // 160 + 1, 80, generator=g)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[VCFlow, Path, Path]:
    torch.manual_seed(0)
    model = VCFlow(**ARGS).eval()
    torch.nn.init.normal_(model.out.weight, std=0.05)  # the flow starts at v = 0: give it a velocity to export
    folder = tmp_path_factory.mktemp("vc_export")
    fp32 = export_onnx(model, _batch(2, 9000, 0), folder / "model.onnx")
    return model, fp32, quantize_int8(fp32, folder / "model.int8.onnx")


def test_untimed_inputs_and_min_time_are_in_the_spec_and_the_file(exported: tuple[VCFlow, Path, Path]) -> None:
    model, fp32, _ = exported
    spec = OnnxModel(fp32).export_spec
    assert spec == model.export_spec
    assert spec.untimed == ("lengths", "ref_emb", "ref_stats") and spec.time_axis("ref_emb") is None
    assert spec.time_axis("ref_stats") is None and spec.min_time == 513
    meta = OnnxModel(fp32).metadata
    assert json.loads(meta["raytrain.vc.vocoder"])["hop_length"] == 160 and meta["raytrain.vc.sample_steps"] == "2"
    with pytest.raises(ValueError, match="first input"):
        ExportSpec(inputs=("ref_emb", "audio"), outputs=("mel",), untimed=("ref_emb",))
    with pytest.raises(ValueError, match="not inputs"):
        ExportSpec(inputs=("audio",), outputs=("mel",), untimed=("lengths",))


def test_onnx_matches_torch_at_other_rows_lengths_and_noise_lengths(exported: tuple[VCFlow, Path, Path]) -> None:
    model, fp32, _ = exported
    onnx = OnnxModel(fp32)
    short_noise = _batch(3, 12345, 1)
    short_noise["noise"] = short_noise["noise"][:, :40]  # fewer noise frames than the source has: zero-padded
    for batch in (_batch(1, 4000, 2), _batch(3, 12345, 1), short_noise):
        assert output_errors(model, onnx, [batch])[0] < 1e-4
        mel = onnx(batch)["mel"]
        other = {**batch, "ref_stats": batch["ref_stats"].flip(-1)}  # the statistics are an input of the graph
        assert (onnx(other)["mel"] - mel).abs().max() > 1e-3
        assert mel.shape == (batch["audio"].shape[0], batch["audio"].shape[1] // 160 + 1, 80)
    with pytest.raises(ValueError, match="at least 513"):
        onnx(_batch(1, 400, 3))


def test_the_vocoder_completes_the_graph_as_forward_does(exported: tuple[VCFlow, Path, Path]) -> None:
    model, fp32, _ = exported
    batch = _batch(2, 8000, 4)
    with torch.no_grad():
        ref = model(batch)
    got = finish_exported(model, OnnxModel(fp32)(batch), batch)
    for key in ("mel_lengths", "frame_mask", "audio_out_lengths"):
        assert torch.equal(got[key], ref[key]), key
    assert got["audio_out"].shape == ref["audio_out"].shape


def test_int8_stays_close(exported: tuple[VCFlow, Path, Path]) -> None:
    model, fp32, int8 = exported
    assert int8.stat().st_size < fp32.stat().st_size
    batch = _batch(2, 8000, 5)
    with torch.no_grad():
        ref = model.export_forward(batch)["mel"]
    got = OnnxModel(int8)(batch)["mel"]
    assert float((got - ref).norm() / ref.norm()) < 0.05


def test_infer_converts_with_the_onnx_file(exported: tuple[VCFlow, Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, _, int8 = exported
    g = np.random.default_rng(0)
    t = np.arange(2 * SR) / SR
    for name, f0 in (("ref", 220.0), ("src", 110.0)):  # voiced-like harmonics: the speaker encoder hears speech
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        sf.write(str(tmp_path / f"{name}.wav"), (0.2 * wave + 0.01 * g.standard_normal(len(t))).astype("float32"), SR)
    out = tmp_path / "out"
    rc = main(["infer", str(int8), "--ref", str(tmp_path / "ref.wav"), str(tmp_path / "src.wav"),
               str(tmp_path / "missing.wav"), "-o", str(out)])
    text = capsys.readouterr()
    assert rc == 1 and "missing.wav: source not found" in text.err  # the other file is still converted
    assert "2 sampling steps" in text.out and "SECS" in text.out
    wave, sr = sf.read(str(out / "src_to_ref.wav"))
    assert sr == SR and len(wave) == 2 * SR
    assert main(["infer", str(int8), "--ref", str(tmp_path / "ref.wav"), str(tmp_path / "src.wav"), "-o", str(out),
                 "--steps", "4"]) == 2
    assert "fixed at export" in capsys.readouterr().err


def test_int8_op_types_keep_the_filterbank_in_fp32(exported: tuple[VCFlow, Path, Path], tmp_path: Path) -> None:
    import onnx

    model, fp32, every = exported
    network = quantize_int8(fp32, tmp_path / "net.int8.onnx", op_types=["Conv", "Gemm"])
    ops = {n.op_type for n in onnx.load(str(network)).graph.node}
    assert "ConvInteger" in ops and "MatMulInteger" not in ops  # the mel filterbank's MatMul stays fp32
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(every)).graph.node}
    batch = _batch(2, 8000, 6)
    with torch.no_grad():
        ref = model.export_forward(batch)["mel"]
    errors = [float((OnnxModel(f)(batch)["mel"] - ref).norm() / ref.norm()) for f in (network, every)]
    assert errors[0] < errors[1], errors
