"""`petal-api`: an OpenAI-compatible HTTP API and a web chat in front of a Petal swarm."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from petal_client.api.config import ApiConfig, ApiConfigError, load_config
from petald.p2p.host import quiet_libp2p_logs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="petal-api",
        description="Serve a Petal swarm's models over OpenAI's HTTP API (/v1) and a web chat (/). Options can "
        "also come from a TOML file (--config) and PETAL_API_* variables (e.g. PETAL_API_INITIAL_PEERS, "
        "space-separated); flags win.",
    )
    p.add_argument("--config", type=Path, help="TOML file with any of the options below (keys: initial_peers, ...)")
    # extend: repeating a flag adds to the list, and no positional argument can be swallowed
    p.add_argument("--initial-peers", nargs="+", action="extend", metavar="MULTIADDR", help="peers of the swarm")
    p.add_argument("--model", dest="models", nargs="+", action="extend", metavar="MODEL", help=_default("models"))
    p.add_argument("--host", help=_default("host"))
    p.add_argument("--port", type=int, help=_default("port") + " (0: any free port)")
    p.add_argument("--api-key", dest="api_keys", nargs="+", action="extend", metavar="KEY", help="accepted keys")
    p.add_argument("--max-concurrent", type=int, help=_default("max_concurrent") + ": generations at once")
    p.add_argument("--max-tokens", type=int, help=_default("max_tokens") + ": new tokens when a request sets none")
    speculation = p.add_mutually_exclusive_group()
    speculation.add_argument(
        "--draft-model", metavar="DIR", help="speculative decoding with this local draft model (shares the tokenizer)"
    )
    speculation.add_argument(
        "--prompt-lookup", type=int, metavar="N", help="speculative decoding with up to N drafts from the prompt"
    )
    return p


def _default(name: str) -> str:
    value = getattr(ApiConfig(), name)
    return f"default {' '.join(value) if isinstance(value, list) else value}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config, vars(args))
    except ApiConfigError as e:
        print(f"petal-api: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libp2p_logs()

    import uvicorn

    from petal_client.api.app import create_app
    from petal_client.api.completion import ServedModel
    from petald.errors import PetalError

    models: dict[str, ServedModel] = {}
    app = None
    try:
        for name in config.models:
            print(f"petal-api: loading {name} and joining the swarm", file=sys.stderr)
            model = ServedModel.load(name, config.initial_peers, config.draft_model, config.prompt_lookup)
            models[model.name] = model
        # bound and listening before the address is printed: whoever reads it can connect at once
        sock = socket.create_server((config.host, config.port))
        host, port = sock.getsockname()[:2]
        print(
            f"petal-api: serving {', '.join(models)} at http://{host}:{port}/v1 (web chat: http://{host}:{port}/, "
            f"swarm monitor: http://{host}:{port}/monitor/)"
        )
        sys.stdout.flush()
        app = create_app(models, config)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    except (PetalError, OSError) as e:
        print(f"petal-api: {e}", file=sys.stderr)
        return 1
    finally:
        if app is not None:
            app.state.monitor.close()
        for model in models.values():
            model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
