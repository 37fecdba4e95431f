"""The `alignlab` command line. Each sub-command validates its inputs first, then calls the core.

  alignlab data synth --out DIR [key=value ...]      generate SynthCaps
  alignlab data import {coco,tsv,webdataset,jsonl}   import a dataset as webdataset shards
  alignlab data filter --data ROOT --out URI         CAT filtering, with DiHT Table A.3 statistics
  alignlab config show CONFIG [key=value ...]        print the resolved, validated config
  alignlab config schema [spec|config]               JSON schema of an ablation spec (or a config), for editors
  alignlab train CONFIG [key=value ...] [--resume [--allow-config-change]]
                                                     train one config (DDP under torchrun)
  alignlab evaluate CHECKPOINT [--out DIR]           run the evaluation suite on a checkpoint
  alignlab run SPEC.yaml [key=value ...] [--resume] [--runner kfp-local|inline] [--verbose]
                                                     run an ablation end to end and print its report
  alignlab report SPEC.yaml [--book]                 rebuild an ablation's report (and its results-book page)
  alignlab gate --experiment nightly --today-run ID  regression gate of a nightly run against its history
  alignlab tracking replay RUN_DIR                   send tracking records an MLflow outage left in a run folder

Bad input (a config, spec, override or file) gives one line `alignlab: error: ...` and exit status 2; a run
that failed exits 1; `--debug` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path

from alignlab.config import ConfigError, RunFailedError
from alignlab.console import TaskFailed
from alignlab.redaction import redact
from alignlab.training.errors import DivergenceError

EXIT_FAILED_RUN, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _cmd_data_synth(args) -> int:
    from alignlab.config import apply_overrides, load_yaml
    from alignlab.data.synth import SynthCapsConfig, generate_synthcaps

    tree = load_yaml(args.config) if args.config else {}
    tree = apply_overrides(tree, args.overrides)
    try:
        cfg = SynthCapsConfig.model_validate(tree)
    except Exception as err:  # pydantic ValidationError: its message names each bad field
        raise ConfigError(f"invalid SynthCaps config:\n{err}") from None
    manifest = generate_synthcaps(args.out, cfg, progress=True)
    print(json.dumps({"out": str(args.out), "counts": manifest["counts"],
                      "dataset_hash": manifest["dataset_hash"]}, indent=2))
    return 0


def _cmd_config_show(args) -> int:
    from alignlab.config import config_to_dict, load_config
    from alignlab.yaml12 import dump_yaml

    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(redact(config_to_dict(cfg))), end="")
    return 0


def _cmd_config_schema(args) -> int:
    from alignlab.ablation import AblationSpec
    from alignlab.config import ExperimentConfig

    model = AblationSpec if args.kind == "spec" else ExperimentConfig
    print(json.dumps(model.model_json_schema(by_alias=True), indent=2))
    return 0


def _cmd_train(args) -> int:
    from alignlab.config import default_run_dir, load_config, output_dir_notice
    from alignlab.experiment import run_experiment

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or default_run_dir(cfg))
    if not args.run_dir and (notice := output_dir_notice(cfg.output_dir)):
        print(f"alignlab: notice: {notice}", file=sys.stderr)
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change only goes with --resume (it lets a resumed run take new values)")
    if args.train_only:
        from alignlab.experiment import train_only

        train_only(cfg, run_dir, resume=args.resume, allow_config_change=args.allow_config_change,
                   mlflow_run_id=args.mlflow_run_id)
        return 0
    if args.mlflow_run_id:
        raise ConfigError("--mlflow-run-id only goes with --train-only (a pipeline's train step); a full "
                          "`alignlab train` creates its own MLflow run")
    metrics = run_experiment(cfg, run_dir, resume=args.resume, allow_config_change=args.allow_config_change)
    print(json.dumps({k: metrics[k] for k in sorted(metrics) if not k.startswith("best_step")}, indent=2))
    return 0


def _cmd_evaluate(args) -> int:
    from alignlab.experiment import evaluate_checkpoint

    out = Path(args.out or Path(args.checkpoint).parent / "eval")
    metrics = evaluate_checkpoint(args.checkpoint, out, data_root=args.data_root, few_shot=args.few_shot)
    print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return 0


def available_runners() -> dict:
    """`inline` (in this process) plus runners other packages register in the entry-point group
    `alignlab.runners`: functions `(spec_path, overrides, *, resume, verbose) -> report folder`."""
    from importlib.metadata import entry_points

    from alignlab.ablation_runner import run_ablation

    return {"inline": run_ablation} | {e.name: e.load() for e in entry_points(group="alignlab.runners")}


def _cmd_run(args) -> int:
    from alignlab.ablation import load_spec
    from alignlab.config import output_dir_notice

    spec, plans = load_spec(args.spec, args.overrides)  # a bad spec fails here, before any runner starts
    if notice := output_dir_notice(plans[0].config.output_dir):
        print(f"alignlab: notice: {notice}", file=sys.stderr)
    runners = available_runners()
    # Default: kfp's local runner (the cluster's pipeline definition) when installed, else inline.
    args.runner = args.runner or ("kfp-local" if "kfp-local" in runners else "inline")
    if args.runner not in runners:
        raise ConfigError(f"--runner {args.runner!r} is not available; choose one of {sorted(runners)}")
    out = runners[args.runner](args.spec, args.overrides, resume=args.resume, verbose=args.verbose)
    _print_next_steps(out, plans[0].config.tracking)
    if spec.gate is not None:  # the gate step rewrote gate.json in this run; its status is the exit status
        status = json.loads((Path(out) / "gate" / "gate.json").read_text())["status"]
        return 1 if status == "regression" else 0
    return 0


def _cmd_tracking_replay(args) -> int:
    from alignlab.tracking import replay_spool

    result = replay_spool(args.run_dir, args.tracking_uri)
    for line in result.rejected:
        print(f"alignlab: refused by MLflow and dropped: {line}", file=sys.stderr)
    if result.remaining:
        print(f"alignlab: error: MLflow at {result.uri} still does not answer: {result.remaining} tracking records "
              f"stay in {args.run_dir}; try again later", file=sys.stderr)
        return EXIT_FAILED_RUN
    print(f"[alignlab] delivered {result.delivered} tracking records from {args.run_dir} to {result.uri or 'MLflow'}")
    return 0


def _cmd_report(args) -> int:
    from alignlab.ablation import load_spec
    from alignlab.ablation_runner import ablation_dir, report_ablation

    spec, plans = load_spec(args.spec, args.overrides)
    if args.book:
        from alignlab.ablation_runner import write_book_page

        command = " ".join(["alignlab report", str(args.spec), *args.overrides, "--book"])
        write_book_page(spec, plans, args.book_dir, command=command)
        if not any((plan.run_dir / "results.json").exists() for plan in plans):
            return 0  # a page that says "not run yet"; no report to rebuild
    report_ablation(spec, plans)
    _print_next_steps(ablation_dir(plans), plans[0].config.tracking)
    return 0


def _print_next_steps(out_dir: Path, tracking) -> None:
    """The report, the task logs, `mlflow ui` for the runs' store (`tracking`: a config's section) and the
    results book."""
    from alignlab.console import next_steps
    from alignlab.tracking import resolve_tracking_uri

    uri = None
    if tracking.enabled:
        uri = resolve_tracking_uri(tracking.tracking_uri)
        uri = "sqlite:///mlflow.db" if uri == f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}" else uri
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    mlflow_bin = "mlflow" if shutil.which("mlflow") == mlflow_bin else mlflow_bin  # on PATH: the short name
    print("\n".join(next_steps(out_dir, uri, mlflow_bin=mlflow_bin)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the SynthCaps benchmark")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--config", type=Path, help="YAML with SynthCaps settings")
    synth.add_argument("overrides", nargs="*", help="key=value, e.g. num_train=20000 mismatch=0.4")
    synth.set_defaults(func=_cmd_data_synth)

    from alignlab.data.cli import add_import_arguments, run_import
    from alignlab.filtering.cli import add_filter_arguments, run_filter

    add_import_arguments(data.add_parser("import", help="import COCO / TSV / webdataset / JSONL pairs as shards")
                         ).set_defaults(func=run_import)
    add_filter_arguments(data.add_parser("filter", help="CAT / CLIP-score filtering of a dataset's pairs")
                         ).set_defaults(func=run_filter)

    config = sub.add_parser("config", help="configs").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved config")
    show.add_argument("config", type=Path)
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_cmd_config_show)
    schema = config.add_parser("schema", help="print the JSON schema of an ablation spec or a config")
    schema.add_argument("kind", nargs="?", choices=("spec", "config"), default="spec",
                        help="spec: an ablations/*.yaml (default); config: a configs/*.yaml")
    schema.set_defaults(func=_cmd_config_schema)

    tr = sub.add_parser("train", help="train one config")
    tr.add_argument("config", type=Path)
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    tr.add_argument("--run-dir", type=Path)
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: continue with a config that differs from the checkpoint's (lr, schedule "
                    "and loss from the new config from the resumed step on; recorded in config_history.jsonl)")
    tr.add_argument("--train-only", action="store_true",
                    help="train and write train_outcome.json, no evaluation (a pipeline step; evaluate runs later)")
    tr.add_argument("--mlflow-run-id", help="with --train-only: log into this open MLflow run instead of a new one")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data-root", help="evaluate on this dataset instead of the training config's")
    ev.add_argument("--out", type=Path)
    ev.add_argument("--few-shot", action="store_true", help="also run the PGD few-shot probe curve (k = 1..16)")
    ev.set_defaults(func=_cmd_evaluate)

    run = sub.add_parser("run", help="run an ablation spec end to end")
    run.add_argument("spec", type=Path)
    run.add_argument("overrides", nargs="*", help="key=value overrides applied to every arm")
    run.add_argument("--resume", action="store_true", help="keep finished runs, resume interrupted ones")
    run.add_argument("--runner", help="where the steps run: kfp-local (default: kfp's local runner, the cluster's "
                     "pipeline definition) or inline (this process, for debugging)")
    run.add_argument("--verbose", action="store_true",
                     help="show every task's output live (default: in runs/<ablation>/logs/, shown when it fails)")
    run.set_defaults(func=_cmd_run)

    tracking = sub.add_parser("tracking", help="MLflow tracking").add_subparsers(dest="tracking_command",
                                                                                 required=True)
    replay = tracking.add_parser("replay", help="send the records an MLflow outage left in a run folder")
    replay.add_argument("run_dir", type=Path)
    replay.add_argument("--tracking-uri", help="the MLflow store (default: the one the records name, else "
                        "$MLFLOW_TRACKING_URI); needed when that URI held credentials, which are not stored")
    replay.set_defaults(func=_cmd_tracking_replay)

    rep = sub.add_parser("report", help="rebuild an ablation report from its runs")
    rep.add_argument("spec", type=Path)
    rep.add_argument("overrides", nargs="*")
    rep.add_argument("--book", action="store_true",
                     help="also write the spec's results-book page (its paper: block) and the book index")
    rep.add_argument("--book-dir", type=Path, default=Path("docs/results"), help="where the book lives")
    rep.set_defaults(func=_cmd_report)

    from alignlab.report.cli import add_gate_arguments, run_gate

    add_gate_arguments(sub.add_parser("gate", help="nightly regression gate against earlier runs in MLflow")
                       ).set_defaults(func=run_gate)
    from alignlab.teachers.cli import register_teacher_commands  # teacher train / cache
    register_teacher_commands(sub)

    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Commands contributed by packages outside the core (pipelines, services) through the entry-point
    group `alignlab.commands`: each entry point is a function `register(subparsers)` that adds its
    sub-commands with `set_defaults(func=...)`. The core never imports those packages itself."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group="alignlab.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as error:  # one broken plugin must not take every other command down with it
            print(f"alignlab: warning: the '{entry.name}' commands ({entry.value}) are unavailable: {error}; "
                  "reinstall the package that provides them", file=sys.stderr)
            continue
        register(sub)


def one_line(message: str) -> str:
    """A multi-line message (a config error lists one field a line) as one line, credentials redacted."""
    lines = [line.strip() for line in redact(message).splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    # `alignlab run spec --resume key=value`: argparse stops a positional list at an option, so key=value
    # overrides after one arrive here; they keep their command-line order (a later one wins).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"alignlab: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - every error ends as one line unless --debug
        if debug:
            raise
        if isinstance(err, (RunFailedError, DivergenceError, TaskFailed)):  # the run failed, the input was fine
            code, text = EXIT_FAILED_RUN, str(err)
        elif isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            code, text = EXIT_BAD_INPUT, str(err)  # ConfigError and pydantic's ValidationError are ValueErrors
        else:
            code, text = EXIT_FAILED_RUN, f"{type(err).__name__}: {err} ({_where(err)}; --debug shows the traceback)"
        print(f"alignlab: error: {one_line(text) or type(err).__name__}", file=sys.stderr)
        return code


def _where(err: BaseException) -> str:
    """File:line where an unexpected error was raised, to report without the whole traceback."""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    return f"at {Path(frame.filename).name}:{frame.lineno}" if frame else "no traceback"


if __name__ == "__main__":
    raise SystemExit(main())
