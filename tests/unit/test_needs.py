"""needed_columns / missing_columns: what a phase reads, from its parts' declarations."""

from __future__ import annotations

from typing import Any

import pytest

from raytrain.data.columns import ColumnNeeds, missing_columns, resolve_columns
from raytrain.needs import needed_columns

from .test_columns import OLD_MIXTURES, OLD_SPEECH

SEP_MODEL = {"name": "convtasnet", "args": {"sample_rate": 8000, "num_sources": 2}}
ASR_MODEL = {"name": "ctc_asr", "args": {"sample_rate": 16000}}
MIX = [{"name": "dynamic_mix", "args": {"num_speakers": 2, "crop_seconds": 1.0}}]


def test_separation_trains_on_speech_through_dynamic_mix_and_scores_fixed_mixtures() -> None:
    train = needed_columns(SEP_MODEL, ["si_sdr_pit"], [], MIX)
    assert train.complete and train.columns == {"audio", "speaker"}
    assert train.to_read(OLD_SPEECH) == ["audio", "speaker"] and missing_columns(train, OLD_SPEECH) == []
    assert "dynamic_mix" in train.explain("audio")
    evaluation = needed_columns(SEP_MODEL, ["si_sdr_pit"], ["si_sdri", "si_sdr"], [])
    assert evaluation.columns == {"mix", "sources"}
    assert evaluation.to_read(OLD_MIXTURES) == ["mix", "s1", "s2"]  # sources: stacked from s1, s2
    assert missing_columns(evaluation, OLD_MIXTURES) == []
    # scoring single-speaker shards without mixing them first cannot work, and says so
    assert missing_columns(evaluation, OLD_SPEECH) == ["mix", "sources (s1, s2, ...)"]
    assert missing_columns(train, OLD_MIXTURES) == ["audio", "speaker"]


def test_streaming_asr_needs_audio_text_and_phonemes_through_ctc_targets() -> None:
    ctc = [{"name": "ctc_targets"}]
    needs = needed_columns(ASR_MODEL, {"asr_ctc": 1.0, "phone_ctc": 0.3}, ["cer", "wer"], ctc)
    assert needs.complete and needs.columns == {"audio", "text", "phonemes"}
    assert "loss phone_ctc (via transform ctc_targets)" in needs.explain("phonemes")
    no_phonemes = {k: v for k, v in OLD_SPEECH["columns"].items() if k != "phonemes"}
    assert missing_columns(needs, no_phonemes) == ["phonemes"]
    # without the phoneme head, a dataset without phonemes is fine; renamed columns follow the args
    assert needed_columns(ASR_MODEL, ["asr_ctc"], ["cer"], ctc).columns == {"audio", "text"}
    renamed = [{"name": "ctc_targets", "args": {"text_column": "words"}}]
    assert needed_columns(ASR_MODEL, ["asr_ctc"], [], renamed).columns == {"audio", "words"}
    # the targets come from the transform: without it they are needed from the dataset, which lacks them
    bare = needed_columns(ASR_MODEL, ["asr_ctc"], [], [])
    assert missing_columns(bare, OLD_SPEECH) == ["asr_targets"]


def undeclared_loss(outputs: dict[str, Any], batch: dict[str, Any]) -> Any:
    return batch["anything"]


class Passthrough:
    def __init__(self, *, sample_rate: int, seed: int) -> None:
        pass

    def __call__(self, batch: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        return batch


def test_parts_without_a_declaration_read_every_column() -> None:
    needs = needed_columns(SEP_MODEL, [undeclared_loss], [], [])
    assert not needs.complete and needs.columns == {"mix"}  # the model's need is still checked
    assert needs.to_read(OLD_MIXTURES) is None
    first = needed_columns(SEP_MODEL, ["si_sdr_pit"], [], [Passthrough, *MIX])
    assert not first.complete and first.columns == set()  # it may make what dynamic_mix reads
    last = needed_columns(SEP_MODEL, ["si_sdr_pit"], [], [*MIX, Passthrough])
    assert not last.complete and last.columns == {"audio", "speaker"}  # dynamic_mix reads the dataset


def test_user_parts_declare_with_an_attribute_or_a_callable_of_their_args() -> None:
    class Model:
        @staticmethod
        def reads(args: dict[str, Any]) -> tuple[str, ...]:
            return ("mix", *(f"enroll{i}" for i in range(args.get("enrollments", 1))))

    needs = needed_columns({"name": Model, "args": {"enrollments": 2}}, [], [], [])
    assert needs.columns == {"mix", "enroll0", "enroll1"}
    assert needed_columns({"name": "convtasnet", "args": {}, "adapter": "separation"}).columns == {"mix"}


@pytest.mark.parametrize(("needed", "available", "read"), [
    ({"sources", "mix"}, ["id", "mix", "s1", "s2", "s3"], ["mix", "s1", "s2", "s3"]),
    ({"sources"}, ["sources", "s1"], ["sources"]),  # a real column of that name wins
    ({"audio"}, ["id"], []),
])
def test_resolve_columns(needed: set[str], available: list[str], read: list[str]) -> None:
    assert resolve_columns(needed, available) == read
    assert ColumnNeeds(frozenset(needed)).to_read(available) == read


def test_phase_needs_of_the_tiny_recipes() -> None:
    from pathlib import Path

    from raytrain.config import load_config
    from raytrain.needs import phase_needs

    configs = Path(__file__).resolve().parents[2] / "configs" / "pipelines"
    sep = load_config(configs / "separation_tiny.yaml")
    trained = 0
    for phase in sep.phases:
        needs = phase_needs(sep.phase_model(phase), phase)
        if "train" in needs:
            trained += 1
            assert needs["train"].columns == {"audio", "speaker"} and needs["eval"].columns == {"mix", "sources"}
            assert missing_columns(needs["train"], OLD_SPEECH) == []
        assert missing_columns(needs["eval"], OLD_MIXTURES) == []
    assert trained == 2
    asr = load_config(configs / "streaming_asr_tiny.yaml")
    for phase in asr.phases:
        needs = phase_needs(asr.phase_model(phase), phase)
        assert needs["eval"].columns == {"audio", "text", "phonemes"} and needs["eval"].complete
        assert all(missing_columns(n, OLD_SPEECH) == [] for n in needs.values())
