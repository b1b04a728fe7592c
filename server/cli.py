"""`titans serve`: every Settings field is a flag (--max-prompt-tokens ...) and a TITANS_* variable; flags win."""

from __future__ import annotations

import argparse
import logging


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from server.settings import Settings

    for name, field in Settings.model_fields.items():
        if name == "api_keys":
            parser.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY[:TENANT]",
                                help="repeatable; also TITANS_API_KEYS='k1:tenant-a,k2'. None: an open server")
            continue
        default = field.default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description or ''} (default {default}; env TITANS_{name.upper()})")
    parser.add_argument("--log-level", default="info")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_keys:
        logging.getLogger("titans.server").warning(
            "API keys given with --api-key can be read in the process list; prefer --api-keys-file")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0
