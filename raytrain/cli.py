"""raytrain command line: prep | plan | run | tune | infer | ckpt diff | demo | cluster-check | schema."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from raytrain.config.loader import ConfigError, load_config


def _plan(args: argparse.Namespace) -> int:
    from raytrain.plan import check_pipeline, format_plan
    from raytrain.preflight import check_datasets

    cfg = load_config(args.config, args.override)
    check_datasets(cfg, prepared=False)  # a bucket that does not answer, a bad manifest: one line
    print(format_plan(cfg, check_pipeline(cfg)), end="")
    return 0


def _verbosity(args: argparse.Namespace) -> None:
    """`--verbose`: Ray's worker log lines go to this command's output too."""
    from raytrain.session import set_verbose

    set_verbose(bool(getattr(args, "verbose", False)))


def _run(args: argparse.Namespace) -> int:
    from raytrain.pipeline import PipelineRunner, summary_table

    _verbosity(args)
    cfg = load_config(args.config, args.override)
    only = [p.strip() for p in args.phases.split(",")] if args.phases else None
    runner = PipelineRunner(cfg, config_text=Path(args.config).read_text(), resume=args.resume, only=only,
                            run_dir=args.run_dir, rebuild_cache=args.rebuild_cache, ignore_gates=args.ignore_gates)
    print(f"run folder: {runner.run_dir}")
    t0 = time.time()
    summary = runner.run()
    print()
    print(summary_table(summary))
    print(f"\nfinished in {time.time() - t0:.0f} s; summary: {runner.run_dir / 'summary.json'}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from raytrain.config.sweep import load_sweep
    from raytrain.jobs import job_paths
    from raytrain.pipeline import resolve_paths
    from raytrain.preflight import preflight
    from raytrain.tune import Sweep

    _verbosity(args)
    cfg = load_config(args.config, args.override)
    sweep = load_sweep(args.sweep)
    preflight(resolve_paths(job_paths(cfg)[0]))  # its bucket, MLflow server and datasets, before Ray starts
    runner = Sweep(cfg, sweep, sweep_text=Path(args.sweep).read_text(), resume=args.resume, sweep_dir=args.sweep_dir,
                   base_run=args.base_run)
    print(f"sweep folder: {runner.dir}  ({sweep.trials_expected()} trials of phase {sweep.phase!r}, "
          f"{sweep.max_concurrent_trials} at a time)")
    t0 = time.time()
    state = runner.run(then_continue=args.then_continue)
    print(f"\nsweep finished in {time.time() - t0:.0f} s: {runner.dir / 'sweep.json'}, plot {runner.dir / 'sweep.png'}")
    if state.get("continued"):
        print(f"later phases from the best trial: {state['continued']}/summary.json")
    print(f"MLflow UI: mlflow ui --backend-store-uri {state['mlflow_uri']}")
    return 0


def _prep(args: argparse.Namespace) -> int:
    _verbosity(args)
    if args.input is not None or args.format is not None:
        return _prep_flags(args)
    if args.config is None:
        raise ConfigError("raytrain prep needs a prep YAML, or --input, --format and --output-dir")
    from datasets_prep.prep import load_prep_config, run_prep_config
    from raytrain.config.loader import parse_override

    overrides = {".".join(k): v for k, v in map(parse_override, args.override)} if args.override else None
    try:
        cfg = load_prep_config(args.config, overrides)
    except ValueError as exc:  # the message names the file and every bad key
        raise ConfigError(str(exc)) from None
    run_prep_config(cfg)
    return 0


def _prep_flags(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from datasets_prep.prep import PrepConfig, run_prep_config
    from datasets_prep.readers.manifests import READERS, ReaderError

    missing = [f for f, v in (("--input", args.input), ("--format", args.format), ("--output-dir", args.output_dir))
               if v is None]
    if missing:
        raise ConfigError(f"raytrain prep: {', '.join(missing)} missing (formats: {', '.join(READERS)})")
    spec: dict = {"name": Path(args.output_dir).name, "input": {"format": args.format, "path": args.input},
                  "output_dir": args.output_dir, "steps": args.steps, "sample_rate": args.sample_rate,
                  "workers": args.workers, "rows_per_shard": args.rows_per_shard, "shard_mb": args.shard_mb,
                  "audio_format": args.audio_format}
    if args.split:
        spec["splits"] = {"ratios": args.split, "by": args.split_by, "seed": args.seed}
    try:
        cfg = PrepConfig.model_validate(spec)
    except ValidationError as exc:
        flag = {"path": "input", "ratios": "split", "by": "split-by"}
        lines = [f"--{flag.get(str(e['loc'][-1]), str(e['loc'][-1])).replace('_', '-')}: {e['msg']}" if e["loc"]
                 else e["msg"].removeprefix("Value error, ") for e in exc.errors()]
        raise ConfigError("raytrain prep: " + "; ".join(lines)) from None
    try:
        run_prep_config(cfg)
    except (ReaderError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return 0


def _infer(args: argparse.Namespace) -> int:
    from raytrain.infer import check_audio, load_model, separate_file
    from raytrain.models import AVTSEASR, CTCASR

    if args.lyrics is not None or args.prompt is not None:
        return _infer_song(args)
    if not args.inputs:
        print("error: give input audio files (or --lyrics and --prompt for a song generator)", file=sys.stderr)
        return 2
    model = load_model(args.source, args.phase)
    if args.video is not None or isinstance(model, AVTSEASR):
        return _infer_av(args, model)
    from raytrain import vc_infer
    from raytrain.models.vc import VCFlow

    if isinstance(model, VCFlow):
        return vc_infer.run(model, args.ref, args.inputs, _out_folder(args), args.steps)
    if vc_infer.is_vc_export(model):
        return vc_infer.run(vc_infer.OnnxConverter(model), args.ref, args.inputs, _out_folder(args), args.steps)
    if args.ref is not None or args.steps is not None:
        print("error: --ref and --steps are for voice-conversion models (vc_flow)", file=sys.stderr)
        return 2
    if isinstance(model, CTCASR):
        from raytrain import asr_infer

        chunk = None if args.full else args.chunk_ms / 1000
        if chunk is not None and model.encoder.kind != "emformer":
            chunk = None
            print("(a Conformer model: full-utterance decoding only; streaming needs the Emformer encoder)")
        asr_infer.run(model, args.inputs, chunk)
        return 0
    out = _out_folder(args)
    for wav in args.inputs:  # every input checked before any is separated
        check_audio(wav)
    for wav in args.inputs:
        for p in separate_file(model, wav, out):
            print(p)
    return 0


def _out_folder(args: argparse.Namespace) -> str:
    """`-o`, the folder the outputs go to; InputError when it is a file."""
    from raytrain.infer import InputError

    if Path(args.output).is_file():
        raise InputError(f"-o {args.output}: is a file; give the folder to write the outputs to")
    return str(args.output)


def _infer_av(args: argparse.Namespace, model: object) -> int:
    from raytrain import av_infer
    from raytrain.models import AVTSEASR, MODELS

    if not isinstance(model, AVTSEASR):
        name = next((n for n in MODELS.names() if MODELS.get(n) is type(model)), type(model).__name__)
        print(f"error: {args.source}: --video is for audio-visual models (av_tse_asr); its model is {name}",
              file=sys.stderr)
        return 2
    if args.video is None:
        print(f"error: {args.source}: an audio-visual model (av_tse_asr) needs the target talker's lip video: "
              "pass --video frames.npy", file=sys.stderr)
        return 2
    if args.ref is not None or args.steps is not None:
        print("error: --ref and --steps are for voice-conversion models (vc_flow)", file=sys.stderr)
        return 2
    return av_infer.run(model, args.video, args.inputs, _out_folder(args))  # a file that does not fit: AVInputError


def _infer_song(args: argparse.Namespace) -> int:
    from raytrain import music_infer

    if args.lyrics is None or args.prompt is None:
        print("error: a song needs both --lyrics and --prompt", file=sys.stderr)
        return 2
    if args.inputs:
        print(f"error: a song generator takes no input files (got {args.inputs[0]}); give --lyrics and --prompt",
              file=sys.stderr)
        return 2
    return music_infer.run(args.source, args.lyrics, args.prompt, args.output, args.phase, args.adapter,
                           args.sketch, args.seconds)  # a bad input: InputError


def _demo(args: argparse.Namespace) -> int:
    """Prep the tiny corpus, run separation_tiny.yaml, print the summary and where to look."""
    from datasets_prep.prep import run_prep
    from raytrain.pipeline import PipelineRunner, summary_table

    _verbosity(args)
    root = Path(args.root)
    t0 = time.time()
    run_prep(root / "configs/prep/separation_tiny.yaml", root=root)
    t_prep = time.time() - t0
    cfg = load_config(root / "configs/pipelines/separation_tiny.yaml", args.override)
    runner = PipelineRunner(cfg, config_text=None)
    summary = runner.run()
    print()
    print(summary_table(summary))
    print(f"\nprep {t_prep:.0f} s, pipeline {time.time() - t0 - t_prep:.0f} s; run folder {runner.run_dir}")
    print(f"summary: {runner.run_dir / 'summary.json'}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    return 0


def _ckpt_diff(args: argparse.Namespace) -> int:
    """What `init_from` of a phase would load, rename and skip from a checkpoint; nothing is trained."""
    import torch

    from raytrain.checkpoints import load_weights, plan_load
    from raytrain.config.schema import InitFromConfig
    from raytrain.models import build_model

    cfg = load_config(args.config, args.override)
    try:
        phase = cfg.phase(args.phase)
    except KeyError as exc:
        raise ConfigError(f"--phase: {exc.args[0]}") from None
    rules = phase.init or InitFromConfig(path=args.checkpoint)
    mcfg = cfg.phase_model(phase)
    with torch.device("meta"):
        model = build_model(mcfg.name, dict(mcfg.args), mcfg.adapter)
    ckpt = load_weights(args.checkpoint)
    report, _ = plan_load({k: v.shape for k, v in ckpt.items()}, {k: v.shape for k, v in model.state_dict().items()},
                          rules.model_copy(update={"on_shape_mismatch": "skip"}), args.checkpoint)
    print(f"phase {phase.name}: init_from rules include={rules.include} exclude={rules.exclude} "
          f"rename={rules.rename} on_shape_mismatch={rules.on_shape_mismatch}")
    print(report.to_table())
    if report.skipped_by_shape and rules.on_shape_mismatch == "error":
        print(f"note: {len(report.skipped_by_shape)} key(s) differ in shape; with on_shape_mismatch: error this "
              "phase would stop. Set it to skip, or exclude those keys.")
    return 0


def _cluster_check(args: argparse.Namespace) -> int:
    """Offline check of Ray cluster-launcher YAMLs: Ray's schema and preparation + raytrain's rules."""
    from raytrain.cluster import load_cluster_yaml, placeholders, validate_cluster_config

    for path in args.configs:
        try:
            cfg = validate_cluster_config(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        types = cfg["available_node_types"]
        print(f"ok: {len(types)} node types in {path} ({', '.join(types)}; head: {cfg['head_node_type']})")
        left = placeholders(load_cluster_yaml(path))
        if left:
            print(f"  edit before `ray up` ({len(left)} EDIT_ME value(s)): {', '.join(left)}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from raytrain.config.reference import write_reference

    return write_reference("markdown" if args.markdown else "json", args.output)


INFER_HELP = ("separate, transcribe or convert audio files, extract a talker with a lip video, or generate a song, "
              "with a trained model")


def infer_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`raytrain infer`'s arguments; `main` parses them intermixed (files may follow options: `infer RUN --ref
    r.wav a.wav`), so the input files may be none (a song generator takes --lyrics and --prompt)."""
    p.add_argument("source", help="run folder runs/<pipeline>/<id>, a phase folder, a model.pt, "
                                  "or an exported separation or vc_flow model .onnx (onnxruntime, CPU)")
    p.add_argument("inputs", nargs="*", help="input wav/flac files (mono or stereo, any sample rate); ASR also takes "
                                             ".tsv manifests; none for a song generator")
    p.add_argument("-o", "--output", default="out", help="output folder (default: out/); a song: its .wav path")
    p.add_argument("--phase", help="phase whose best checkpoint to use (default: the last finished)")
    p.add_argument("--chunk-ms", type=float, default=640.0,
                   help="ASR with an Emformer: stream the audio in chunks of this many ms (default 640)")
    p.add_argument("--full", action="store_true", help="ASR: full-utterance decoding only, no streaming")
    p.add_argument("--video", help="audio-visual extraction: lip video of the target talker: .npy/.npz uint8 "
                                   "frames at 25 fps, (frames, H, W) or (frames, H, W, C); for each input")
    p.add_argument("--ref", help="voice conversion: a recording of the target voice (1.6 s or more of speech)")
    p.add_argument("--steps", type=int, help="voice conversion: sampling steps of the flow (default: the model's)")
    p.add_argument("--lyrics", help="song generation: the lyrics, with section tags, e.g. \"[verse] light on the river\"")
    p.add_argument("--prompt", help="song generation: a style prompt (a few seconds of a song)")
    p.add_argument("--sketch", help="song generation: a melody sketch token file (.npy, .npz, .pt); default: none")
    p.add_argument("--seconds", type=float, help="song generation without a sketch: its length (default 6)")
    p.add_argument("--adapter", help="song generation: a LoRA adapter.pt to load unmerged on --phase's weights")
    p.set_defaults(fn=_infer)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raytrain", description=__doc__)
    # `main` takes --debug out of the command line wherever it is (every subcommand accepts it); listed here
    # for --help
    ap.add_argument(DEBUG, action="store_true", help="on an error, show its Python traceback instead of the "
                                                     "one-line message (before or after the subcommand)")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="pipeline YAML, e.g. configs/pipelines/separation_tiny.yaml")
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="e.g. -o phases.1.optim.lr=3e-4 or -o phases.long.max_steps=10 (repeatable)")

    def with_verbose(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also print Ray's worker log lines, `(RayTrainWorker pid=...) ...` (default: the "
                            "session's log files only; a failed phase still shows its worker's error)")

    p = sub.add_parser("plan", help="validate a pipeline and print its phase table (no Ray)")
    with_config(p)
    p.set_defaults(fn=_plan)
    p = sub.add_parser("run", help="run a pipeline's phases on Ray Train")
    with_config(p)
    p.add_argument("--phases", help="comma-separated phase names to run (others are skipped)")
    p.add_argument("--resume", action="store_true", help="continue the last unfinished run of this pipeline")
    p.add_argument("--run-dir", help="use this run folder (default runs/<pipeline>/<timestamp>)")
    p.add_argument("--ignore-gates", action="store_true",
                   help="a gate that is not met is recorded in summary.json and MLflow; the pipeline goes on")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="cache phases run their model again even where a cached dataset has the same key")
    with_verbose(p)
    p.set_defaults(fn=_run)
    p = sub.add_parser("tune", help="sweep one phase's config with Ray Tune (ASHA), every trial in MLflow")
    with_config(p)
    p.add_argument("--sweep", required=True, help="sweep YAML, e.g. configs/sweeps/separation_tiny.yaml")
    p.add_argument("--then-continue", action="store_true",
                   help="then run the later phases from the best trial's checkpoint, as one pipeline run")
    p.add_argument("--resume", action="store_true", help="continue the last unfinished sweep of this pipeline")
    p.add_argument("--sweep-dir", help="use this sweep folder (default runs/<pipeline>/sweeps/<timestamp>)")
    p.add_argument("--base-run", metavar="RUN",
                   help="take the phases before the swept one from this finished run of the same config")
    with_verbose(p)
    p.set_defaults(fn=_tune)
    p = sub.add_parser("prep", help="prepare a corpus into Parquet shards (a prep YAML, or flags)")
    p.add_argument("config", nargs="?", help="prep YAML, e.g. configs/prep/separation_tiny.yaml")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--input", "--input-dir", dest="input", help="corpus folder or manifest file (flag form)")
    p.add_argument("--format", help="speaker-dirs | jsonl | tsv | wsj0-2mix")
    p.add_argument("--output-dir", help="dataset folder to write")
    p.add_argument("--steps", nargs="*", default=[], help="resample normalize vad_trim segment features")
    p.add_argument("--sample-rate", type=int, help="output rate (resample), else the rate files must have")
    p.add_argument("--workers", type=int, default=2, help="Ray Data tasks at once (0: this process, no Ray)")
    p.add_argument("--rows-per-shard", type=int, default=200, help="input files per shard (default 200)")
    p.add_argument("--shard-mb", type=float, help="also cut shards at about this many MB of input audio")
    p.add_argument("--audio-format", default="pcm_s16le", help="pcm_s16le (default) | flac | f32le")
    p.add_argument("--split", help="split ratios, e.g. train=0.9,dev=0.05,test=0.05: one dataset folder each")
    p.add_argument("--split-by", default="item", choices=["item", "speaker"], help="split by item or by speaker")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    with_verbose(p)
    p.set_defaults(fn=_prep)
    infer_args(sub.add_parser("infer", help=INFER_HELP))
    p = sub.add_parser("ckpt", help="checkpoint tools: `ckpt diff CKPT PIPELINE --phase P`")
    ck = p.add_subparsers(dest="ckpt_command", required=True)
    p = ck.add_parser("diff", help="what a phase's init_from would load, rename and skip from CKPT (no training)")
    p.add_argument("checkpoint", help="a model.pt / state.pt (or a folder holding one)")
    with_config(p)
    p.add_argument("--phase", required=True, help="the phase whose model and init_from rules to use")
    p.set_defaults(fn=_ckpt_diff)
    p = sub.add_parser("demo", help="prep a tiny corpus and run separation_tiny.yaml end to end")
    p.add_argument("--root", default=".", help="project folder holding configs/")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    with_verbose(p)
    p.set_defaults(fn=_demo)
    p = sub.add_parser("cluster-check", help="check Ray cluster-launcher YAMLs offline (no cloud, no Ray started)")
    p.add_argument("configs", nargs="+", help="e.g. cluster.yaml configs/clusters/gcp.yaml")
    p.set_defaults(fn=_cluster_check)
    p = sub.add_parser("schema", help="the pipeline YAML's reference from the config models: Markdown "
                                      "(docs/config.md) or a JSON Schema for editors")
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--markdown", action="store_true", help="each key's type, default, constraint, meaning")
    fmt.add_argument("--json", action="store_true", help="a JSON Schema (draft 2020-12) of pipeline YAMLs")
    p.add_argument("-o", "--output", help="file to write (default: stdout)")
    p.set_defaults(fn=_schema)
    return ap


def split_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain prep split",
                                description="split a JSONL/TSV manifest into seeded train/valid/test manifests")
    p.add_argument("manifest", help="a .jsonl or .tsv manifest")
    p.add_argument("--ratios", required=True, help="e.g. valid=0.05,test=0.05 (the rest is train)")
    p.add_argument("--by", choices=["item", "speaker"], default="item", help="unit that is dealt to splits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speaker-key", default="speaker", help="field holding the speaker (--by speaker)")
    p.add_argument("-o", "--output-dir", help="folder for the split manifests (default: beside the input)")
    p.set_defaults(fn=_prep_split)
    return p


def _prep_split(args: argparse.Namespace) -> int:
    from datasets_prep.splits import split_manifest

    try:
        out = split_manifest(args.manifest, args.ratios, by=args.by, seed=args.seed, output_dir=args.output_dir,
                             speaker_key=args.speaker_key)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"raytrain prep split {args.manifest}: {exc}") from None
    for name, path in out.items():
        print(f"{name:<8} {sum(1 for _ in open(path, encoding='utf-8')):>8} lines  {path}")
    return 0


def dummy_songs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain prep dummy-songs",
                                description="write a small synthetic song dataset: audio, prompt wavs, sketch token "
                                            "files and a JSONL manifest (idx, audio_path, lyrics, prompt_wav, "
                                            "sketch_path)")
    p.add_argument("--output-dir", required=True, help="folder to write (songs.jsonl and audio/ prompts/ sketch/)")
    p.add_argument("--num-samples", type=int, required=True, help="songs to write")
    p.add_argument("--duration-sec", type=float, default=10.0, help="seconds of each song's audio (default 10)")
    p.add_argument("--prompt-sec", type=float, default=3.0, help="seconds of each prompt wav (default 3)")
    p.add_argument("--sketch-fps", type=float, default=25.0, help="sketch tokens per second (default 25)")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate of the wavs (default 16000)")
    p.add_argument("--sketch-format", default="pt", choices=["pt", "pt-dict", "npy", "npz", "mixed"],
                   help="pt: a tensor; pt-dict: {'sketch': tensor}; npy; npz; mixed: the four in turn")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_prep_dummy_songs)
    return p


def _prep_dummy_songs(args: argparse.Namespace) -> int:
    from datasets_prep.songs import write_dummy_songs

    try:
        manifest = write_dummy_songs(args.output_dir, num_samples=args.num_samples, duration_sec=args.duration_sec,
                                     prompt_sec=args.prompt_sec, sketch_fps=args.sketch_fps,
                                     sample_rate=args.sample_rate, sketch_format=args.sketch_format, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(f"raytrain prep dummy-songs: {exc}") from None
    print(f"{args.num_samples} songs: {manifest}  (prepare with: raytrain prep --input {manifest} --format jsonl "
          f"--output-dir DIR)")
    return 0


DEBUG = "--debug"
# Exceptions that are the user's to fix: a bad config key, file or path. Named by module so that checking one
# imports nothing (a module not imported yet cannot have raised its error).
USER_ERRORS = (("raytrain.checkpoints", "CheckpointError"), ("raytrain.infer", "InputError"),
               ("raytrain.runs", "SummaryError"))


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug` (taken anywhere before a `--`, so every subcommand accepts it before or after
    its own arguments), and whether it was given."""
    end = argv.index("--") if "--" in argv else len(argv)
    if DEBUG not in argv[:end]:
        return argv, False
    return [a for a in argv[:end] if a != DEBUG] + argv[end:], True


def is_user_error(exc: BaseException) -> bool:
    """A bad file, key or path (exit 2, one line) rather than a failure of the pipeline or a bug."""
    if isinstance(exc, ConfigError | FileNotFoundError):
        return True
    return any(isinstance(exc, cls) for mod, name in USER_ERRORS
               if (cls := getattr(sys.modules.get(mod), name, None)) is not None)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a user error: a bad config key, input file, checkpoint, run folder, dataset folder,
    or a bucket or MLflow server that does not answer, printed as one line on stderr (`error: <file or key>:
    <what is wrong>; <the fix>`; argparse's usage errors are 2 as well); 1 the pipeline failed: a phase crashed
    or a gate was not met (`error: ...` with how to resume), or `infer` converted only some of its files.
    `--debug` (anywhere on the command line) raises the error instead, with its traceback."""
    argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    if argv[:2] == ["prep", "split"]:
        args = split_parser().parse_args(argv[2:])
    elif argv[:2] == ["prep", "dummy-songs"]:
        args = dummy_songs_parser().parse_args(argv[2:])
    elif argv[:1] == ["infer"]:
        args = infer_args(argparse.ArgumentParser(prog="raytrain infer", description=INFER_HELP)
                          ).parse_intermixed_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return int(args.fn(args) or 0)
    except Exception as exc:
        if debug:
            raise
        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from raytrain.phases.base import PipelineError

        if isinstance(exc, PipelineError):  # a phase crashed or a gate was not met
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
