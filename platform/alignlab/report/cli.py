"""`alignlab gate`: gate today's nightly run(s) against the previous nightlies in MLflow.

    alignlab gate --tracking-uri URI --experiment nightly --rules ablations/gates/nightly_gate.yaml \\
        --today-run RUN_ID [--today-run RUN_ID ...] --out DIR [--textfile PATH.prom] [--pushgateway URL]

Each today-run is compared with the FINISHED runs of the same experiment that carry its ablation and arm
tags and started before it. Writes DIR/gate.md and DIR/gate.json, then the Prometheus exports. Exit status:
0 ok or insufficient history, 1 regression, 2 bad input or a failed export (a regression still exits 1).
"""

import argparse
import sys
from pathlib import Path

# MLflow and the gate are imported inside the functions: `add_gate_arguments` runs on every `alignlab`
# invocation when the CLI wires it, and must not pay MLflow's import time.


def add_gate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `alignlab gate` options to `parser` (a sub-command parser or a standalone one)."""
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the nightly runs")
    parser.add_argument("--rules", required=True, type=Path, help="gate rules YAML")
    parser.add_argument("--today-run", required=True, action="append", dest="today_runs", metavar="RUN_ID",
                        help="MLflow run id of today's run; repeat once per arm of the suite")
    parser.add_argument("--out", required=True, type=Path, help="folder for gate.md and gate.json")
    parser.add_argument("--suite", help="suite label of the Prometheus gauges (default: the experiment)")
    parser.add_argument("--textfile", type=Path, help="write the gauges here (*.prom, node-exporter textfile)")
    parser.add_argument("--pushgateway", help="push the gauges to this Pushgateway URL")
    parser.add_argument("--push-job", default="alignlab_gate", help="Pushgateway job name")
    return parser


def run_gate(args: argparse.Namespace) -> int:
    """Run the gate for parsed `add_gate_arguments` options; returns the exit status (module docstring)."""
    from alignlab.report.regression_gate import gate_exit_code, gate_runs, load_gate_config, write_gate_report
    from alignlab.tracking import resolve_tracking_uri

    try:
        config = load_gate_config(args.rules)
        result = gate_runs(resolve_tracking_uri(args.tracking_uri), args.experiment, args.today_runs, config)
    except (ValueError, FileNotFoundError) as error:
        print(f"alignlab gate: error: {error}", file=sys.stderr)
        return 2
    paths = write_gate_report(result, args.out)
    print(result.to_markdown(), end="")
    print(f"[alignlab] gate {result.status}: {paths['md']}, {paths['json']}")
    if result.counts["missing"]:
        print(f"[alignlab] warning: {result.counts['missing']} gated metric(s) missing today", file=sys.stderr)
    code = gate_exit_code(result)
    if args.textfile or args.pushgateway:
        from alignlab.report.prometheus import push_gate, write_gate_textfile

        suite = args.suite or args.experiment
        try:
            if args.textfile:
                write_gate_textfile(result, args.textfile, suite)
            if args.pushgateway:
                push_gate(result, args.pushgateway, args.push_job, suite)
        except (OSError, ValueError) as error:  # URLError is an OSError
            print(f"alignlab gate: error: Prometheus export failed: {error}", file=sys.stderr)
            return code or 2
    return code


def main_gate(argv: list[str] | None = None) -> int:
    """Standalone entry: parse `argv` (default sys.argv[1:]) with the gate options and run the gate."""
    parser = add_gate_arguments(argparse.ArgumentParser(prog="alignlab gate", description=__doc__,
                                                        formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_gate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main_gate())
