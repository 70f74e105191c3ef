"""`vllm-guard run --config PATH`, `vllm-guard check-config PATH` and `vllm-guard status`.

Without a path, run and check-config read the file named by the environment variable
VLLM_GUARD_CONFIG (how the container image is pointed at its ConfigMap), else ./config.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from gateway.config import ConfigError, load_config

STATUS_TIMEOUT_S = 10.0

CONFIG_ENV = "VLLM_GUARD_CONFIG"


def default_config_path() -> str:
    """The config path when none is given: $VLLM_GUARD_CONFIG when set, else config.yaml."""
    return os.environ.get(CONFIG_ENV, "").strip() or "config.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-guard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the gateway")
    run.add_argument(
        "--config",
        default=default_config_path(),
        help=f"path to config.yaml (default: ${CONFIG_ENV}, else config.yaml)",
    )
    check = sub.add_parser(
        "check-config", help="validate a config file and the files it names; exit 0 or 1"
    )
    check.add_argument("path", nargs="?", default=default_config_path())
    status = sub.add_parser("status", help="what a running gateway is doing (its admin listener)")
    status.add_argument(
        "--config", default=default_config_path(), help="where to find the admin listener"
    )
    status.add_argument("--url", help="the admin listener's URL, instead of the config's")
    status.add_argument("--json", action="store_true", help="print the JSON as served")
    args = parser.parse_args(argv)

    if args.command == "status":
        return _status(args.config, args.url, as_json=args.json)
    if args.command == "check-config":
        return _check(args.path)

    # Imported here so that check-config and status stay light.
    import uvloop

    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.serve import serve
    from gateway.snapshot import load_snapshot
    from gateway.tokens import TokenCounters

    try:
        # Validated as check-config does (errors with their lines) before anything starts;
        # the app then makes its own counters, with the engine to ask.
        config = load_snapshot(args.config, TokenCounters(None)).config
        app = create_app(config, config_path=Path(args.config).absolute())
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    configure_logging(config.logging)
    try:
        # uvloop: the event loop in C (libuv); the relay's sockets cost less CPU per request.
        uvloop.run(serve(app, config))
    except ConfigError as err:  # a file the policies name, read before anything listens
        print(err, file=sys.stderr)
        return 1
    return 0


def _check(path: str) -> int:
    """The file, and every tokenizer folder and chat template it names, as a reload would."""
    from gateway.snapshot import load_snapshot
    from gateway.tokens import TokenCounters

    try:
        snapshot = load_snapshot(path, TokenCounters(None))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    for warning in snapshot.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(f"{path}: ok")
    return 0


def _admin_url(config_path: str) -> str:
    config = load_config(config_path).admin
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def _status(config_path: str, url: str | None, *, as_json: bool) -> int:
    from gateway.status import render_status

    try:
        base = url.rstrip("/") if url else _admin_url(config_path)
        token_env = load_config(config_path).admin.token_env if Path(config_path).exists() else ""
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    headers = {"Accept": "application/json"}
    token = os.environ.get(token_env or "VLLM_GUARD_ADMIN_TOKEN", "").strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + "/status", headers=headers)  # noqa: S310 - http(s) only
    try:
        with urllib.request.urlopen(request, timeout=STATUS_TIMEOUT_S) as resp:  # noqa: S310
            view = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        print(f"{base}/status answered {err.code}: {err.read().decode(errors='replace')}")
        return 1
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(f"cannot read {base}/status: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(view, indent=2) if as_json else render_status(view), end="\n" if as_json else ""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
