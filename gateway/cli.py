"""`vllm-guard run --config PATH` and `vllm-guard check-config PATH`.

Without a path, both read the file named by the environment variable VLLM_GUARD_CONFIG
(how the container image is pointed at its ConfigMap), else ./config.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from gateway.config import ConfigError, load_config

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
    check = sub.add_parser("check-config", help="validate a config file; exit 0 or 1")
    check.add_argument("path", nargs="?", default=default_config_path())
    args = parser.parse_args(argv)

    path = args.config if args.command == "run" else args.path
    try:
        config = load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(f"{path}: ok")
        return 0

    # Imported here so that check-config stays light.
    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.serve import serve

    configure_logging(config.logging)
    asyncio.run(serve(create_app(config), config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
