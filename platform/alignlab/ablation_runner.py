"""The ablation runner: a whole spec inline (shared data once, the spec's prepare steps, every arm x seed), then
its report, its regression gate and its results-book page. `alignlab run --runner inline` calls
`run_ablation`; the KFP pipeline (alignlab_pipelines) runs the same pieces as steps. One run's pieces (train,
evaluate, track) are in `alignlab.experiment`; the prepare steps in `alignlab.prepare`.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignlab.ablation import AblationSpec, RunPlan, load_spec
from alignlab.config import ConfigError
from alignlab.data.roots import resolve_data_root
from alignlab.experiment import ensure_dataset, run_experiment
from alignlab.prepare import run_prepare
from alignlab.redaction import redact

# The report (scipy, matplotlib) and MLflow are imported inside the functions: a pipeline's report and gate
# steps import this module in a fresh process each.


def run_ablation(spec_path: str | Path, overrides: list[str] | None = None, *, resume: bool = False,
                 verbose: bool = False, print_fn=print) -> Path:
    """Expand the spec, run the shared data step once per distinct dataset, the spec's `prepare` steps (in
    order, each skipped when its output is complete), then every arm x seed, the report and the gate.

    Each of those is a task of `alignlab.console.TaskConsole`: one line per task, its output in
    runs/<ablation>/logs/ (`verbose`: also live); a failed task raises TaskFailed."""
    from alignlab.console import TaskConsole

    spec, plans = load_spec(spec_path, overrides)
    several = [plan.run_name for plan in plans if (plan.config.train.ranks or 1) > 1]
    if several:
        raise ConfigError(f"runs {several} set train.ranks > 1, which the inline runner (this one process) cannot "
                          f"launch: run the spec with --runner kfp-local (a TorchX job per run)")
    roots = sorted({str(resolve_data_root(p.config.data)) for p in plans})
    console = TaskConsole(ablation_dir(plans) / "logs", verbose=verbose)
    print_fn(f"alignlab run {spec.name}: {len(spec.arm_overrides())} arms x {len(spec.seeds)} seeds = {len(plans)} "
             f"runs, inline; task logs in {console.log_dir}/")
    console.queued([f"data {Path(root).name}" for root in roots] + (["prepare"] if spec.prepare else [])
                   + [f"run {plan.arm}/seed-{plan.seed}" for plan in plans] + ["report"]
                   + (["gate"] if spec.gate is not None else []))
    printed: list[str] = []
    try:
        for root in roots:
            plan = next(p for p in plans if str(resolve_data_root(p.config.data)) == root)
            with console.task(f"data {Path(root).name}"):
                ensure_dataset(plan.config)
        if spec.prepare:
            with console.task("prepare"):
                run_prepare(spec, plans)
        for plan in plans:
            label = f"run {plan.arm}/seed-{plan.seed}"
            if resume and (plan.run_dir / "results.json").exists():
                console.skipped(label, "already finished")
                continue
            with console.task(label):
                run_experiment(plan.config, plan.run_dir, ablation=spec.name, arm=plan.arm, resume=resume)
        with console.task("report"):
            out_dir = report_ablation(spec, plans, print_fn=printed.append)
        if spec.gate is not None:
            with console.task("gate"):
                gate_ablation(spec, plans, print_fn=printed.append)
    finally:
        console.close()
    print_fn("\n" + "\n".join(printed).rstrip())
    return out_dir


def ablation_dir(plans: list[RunPlan]) -> Path:
    return Path(plans[0].config.output_dir) / plans[0].ablation


def collect_records(plans: list[RunPlan]) -> tuple[list[dict], list[dict]]:
    """(records of the runs with results.json, {"arm", "seed", "reason"} of the planned runs without one)."""
    records, missing = [], []
    for plan in plans:
        path = plan.run_dir / "results.json"
        if path.exists():
            records.append({"arm": plan.arm, "seed": plan.seed, "metrics": json.loads(path.read_text())})
        else:
            reason = "started but has no results.json (failed or interrupted)" if plan.run_dir.exists() else "not run"
            missing.append({"arm": plan.arm, "seed": plan.seed, "reason": f"{reason}: {plan.run_dir}"})
    return records, missing


def report_ablation(spec: AblationSpec, plans: list[RunPlan], *, print_fn=print) -> Path:
    """Write runs/<ablation>/report.{md,csv,json} from the run folders and print the headline table; runs
    without results are listed in the report as missing. Holm's correction covers the spec's
    `report_metrics` (the questions the spec asks), over every arm."""
    from alignlab.report import build_report, write_report
    from alignlab.report.curves import plot_metric_curves

    records, missing = collect_records(plans)
    out_dir = ablation_dir(plans)
    if not records:
        raise FileNotFoundError(f"no finished runs under {out_dir}: run `alignlab run` first")
    table = build_report(records, baseline=spec.baseline_arm, family=spec.report_metrics, missing_runs=missing)
    write_report(table, out_dir, metrics=spec.report_metrics)
    print_fn(table.to_markdown(metrics=spec.report_metrics, details=False))
    if spec.report_plot is not None:
        plot = spec.report_plot
        points = {p.arm: (redact(str(p.config_value(plot.group))) if plot.group else spec.name,
                          float(p.config_value(plot.x)))
                  for p in plans if p.arm in table.arms}
        png = plot_metric_curves(table, points, plot.metrics, out_dir / "report_plot.png", x_label=plot.x)
        print_fn(f"plot: {png}")
    return out_dir


GATE_DIR = "gate"


def gate_ablation(spec: AblationSpec, plans: list[RunPlan], *, print_fn=print):
    """The spec's regression gate (None without one): every run of this ablation against the earlier FINISHED
    runs of its arm in MLflow. Writes runs/<ablation>/gate/gate.{md,json} and the Prometheus exports the spec
    asks for; returns the GateResult (`status` "regression" when a violation repeated)."""
    if spec.gate is None:
        return None
    from alignlab.report.regression_gate import gate_runs, load_gate_config, write_gate_report
    from alignlab.tracking import RUN_ID_FILE, resolve_tracking_uri

    cfg = plans[0].config
    if not cfg.tracking.enabled:
        raise ConfigError(f"ablation {spec.name} has a gate but tracking.enabled is false: the gate compares "
                          f"MLflow runs; enable tracking")
    run_ids = []
    for plan in plans:
        path = plan.run_dir / RUN_ID_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run {plan.run_name} was not tracked in MLflow, so the "
                                    f"gate has nothing to compare (re-run it with tracking enabled)")
        run_ids.append(path.read_text().strip())
    result = gate_runs(resolve_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment or spec.name, run_ids,
                       load_gate_config(spec.gate.rules))
    out_dir = ablation_dir(plans) / GATE_DIR
    paths = write_gate_report(result, out_dir)
    if spec.gate.textfile or spec.gate.pushgateway:
        from alignlab.report.prometheus import push_gate, write_gate_textfile

        if spec.gate.textfile:
            write_gate_textfile(result, spec.gate.textfile, spec.name)
        if spec.gate.pushgateway:
            push_gate(result, spec.gate.pushgateway, "alignlab_gate", spec.name)
    print_fn(result.to_markdown())
    print_fn(f"[alignlab] gate {result.status}: {paths['md']}")
    return result


def recipe_summary(plans: list[RunPlan]) -> str:
    """One line that says what the runs of a book page trained (the base recipe of its first plan)."""
    cfg = plans[0].config
    synth = cfg.data.synth
    data = (f"SynthCaps {synth.num_train} pairs, object_scale {synth.object_scale}, max_objects "
            f"{synth.max_objects}" if synth is not None else f"data {cfg.data.root}")
    length = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs} epochs"
    seeds = sorted({p.seed for p in plans})
    return (f"model preset {cfg.model.preset} at {cfg.data.image_size} px, {data}, batch {cfg.train.batch_size}, "
            f"lr {cfg.train.lr}, {length}, seeds {seeds}")


def write_book_page(spec: AblationSpec, plans: list[RunPlan], book_dir: str | Path, *, command: str,
                    print_fn=print) -> Path:
    """docs/results/<spec>.md from the spec's finished runs (see alignlab.report.book), and the book index."""
    from alignlab.report.book import book_page, write_book_index

    records, _ = collect_records(plans)
    text, status = book_page(spec, records, command=command, recipe=recipe_summary(plans))
    out = Path(book_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{spec.name}.md"
    path.write_text(text)
    write_book_index(out)
    print_fn(f"[alignlab] results book page: {path} ({status})")
    return path
