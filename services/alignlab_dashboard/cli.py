"""`alignlab dashboard`, plugged into the core CLI (entry-point group `alignlab.commands`).

  alignlab dashboard [--host 127.0.0.1] [--port 8050] [--tracking-uri URI] [--specs ablations] [--runs runs]
                     [--tokens FILE] [--proxy-user-header H --proxy-role R] [--kfp-host URL]
                     [--mlflow-ui URL] [--kfp-ui URL]
  alignlab dashboard --tokens FILE --new-token NAME:ROLE      add an API token (printed once) and exit
"""

import argparse
from pathlib import Path


def _cmd_dashboard(args) -> int:
    from alignlab_dashboard.auth import add_token

    if args.new_token:
        name, _, role = args.new_token.partition(":")
        if not args.tokens or not name or not role:
            raise ValueError("--new-token NAME:ROLE needs --tokens FILE (role: viewer, submitter or admin)")
        token = add_token(args.tokens, name, role)
        print(f"[alignlab] token for {name} ({role}) added to {args.tokens} (stored hashed); it is shown only now:")
        print(token)
        return 0
    if not args.tokens and not args.proxy_user_header and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--host {args.host} without --tokens would open the dashboard to the network with no "
                         f"authentication; add --tokens FILE (create one with --new-token NAME:ROLE)")
    import uvicorn

    from alignlab.redaction import redact
    from alignlab_dashboard.app import create_app
    from alignlab_dashboard.settings import DashboardSettings

    settings = DashboardSettings(tracking_uri=args.tracking_uri, specs_dir=args.specs, runs_dir=args.runs,
                                 jobs_dir=args.runs / "dashboard-jobs", tokens_file=args.tokens,
                                 proxy_user_header=args.proxy_user_header, proxy_role=args.proxy_role,
                                 kfp_host=args.kfp_host, mlflow_ui_url=args.mlflow_ui, kfp_ui_url=args.kfp_ui)
    app = create_app(settings)
    auth = "tokens from " + str(args.tokens) if args.tokens else ("proxy header " + args.proxy_user_header
                                                                 if args.proxy_user_header else "off (local only)")
    print(f"[alignlab] dashboard on http://{args.host}:{args.port}/  (MLflow {redact(app.state.ctx.store.uri)}, "
          f"auth {auth}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(subparsers) -> None:
    """Add `dashboard` to the `alignlab` command's sub-parsers."""
    dash = subparsers.add_parser("dashboard", help="web dashboard: compare ablations, submit specs, nightly gate",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dash.add_argument("--port", type=int, default=8050)
    dash.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    dash.add_argument("--specs", type=Path, default=Path("ablations"), help="folder of shipped ablation specs")
    dash.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (reports, gate outputs)")
    dash.add_argument("--tokens", type=Path, help="YAML file of hashed API tokens (auth off without it)")
    dash.add_argument("--new-token", metavar="NAME:ROLE", help="add a token to --tokens, print it once, exit")
    dash.add_argument("--proxy-user-header", help="trusted reverse-proxy user header, e.g. X-Forwarded-User")
    dash.add_argument("--proxy-role", default="viewer", choices=("viewer", "submitter", "admin"))
    dash.add_argument("--kfp-host", help="KFP API endpoint to submit to (default: only the local runner)")
    dash.add_argument("--mlflow-ui", help="MLflow UI base URL for links")
    dash.add_argument("--kfp-ui", help="KFP UI base URL for links")
    dash.set_defaults(func=_cmd_dashboard)
