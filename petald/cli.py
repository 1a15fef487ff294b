"""`petald`: start a node, run a bootstrap DHT node, make an identity, inspect the swarm, prepare models."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="petald", description="Petal node: serve transformer blocks to a swarm.")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="manage local model checkpoints")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = model_commands.add_parser(
        "prepare", help="convert a built-in model or a GGUF file into a safetensors checkpoint in the model cache"
    )
    prepare.add_argument("name", nargs="?", help="built-in model name (e.g. smollm2-135m)")
    prepare.add_argument(
        "--gguf",
        type=Path,
        help="a GGUF file to convert (Llama, Mistral, Qwen2/3 and their MoE, Falcon, Phi-3, BLOOM, Gemma 2/3)",
    )
    prepare.add_argument("--name", dest="gguf_name", help="the name to give the converted --gguf model")

    keygen = commands.add_parser("keygen", help="write a new Ed25519 node identity and print its peer id")
    keygen.add_argument("--out", type=Path, required=True, help="where to write the key (mode 0600, never overwritten)")

    for name, help_text in (("start", "serve a span of blocks"), ("dht", "run a DHT-only node (a bootstrap peer)")):
        _add_node_options(commands.add_parser(name, help=help_text), serving=name == "start")

    status = commands.add_parser("status", help="show which servers hold which blocks")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    status.add_argument("--model", help="only this model")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    monitor = commands.add_parser("monitor", help="serve a web page (and JSON, Prometheus metrics) of the swarm")
    monitor.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    monitor.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    monitor.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0 = any free port)")
    monitor.add_argument("--refresh", type=float, default=10.0, help="seconds between reads of the swarm (default 10)")

    args = parser.parse_args(argv)
    if args.command in ("start", "dht"):
        return _run_node(args)
    if args.command == "status":
        from petald.status import print_status

        return print_status(args.initial_peers, args.model, args.json)
    if args.command == "monitor":
        return _monitor(args)
    if args.command == "model":
        return _model_prepare(parser, args)
    if args.command == "keygen":
        return _keygen(args)
    parser.error(f"unknown command {args.command}")
    return 2


NODE_OPTIONS_HELP = {
    "model": "model: a built-in name (smollm2-135m), a local Hugging Face directory or a hub id",
    "blocks": "serve blocks A:B (e.g. 10:20)",
    "num_blocks": "serve N blocks where the swarm is weakest, and move them when the swarm needs it",
    "max_memory": "serve as many blocks as fit in SIZE (e.g. 2GB, 1.5GiB): each block's weights as --quant stores "
    "them plus its share of --max-cache-tokens; with --num-blocks, at most that many",
    "balance_quality": "with --num-blocks: move when the weakest block's throughput before/after is below this "
    "(default 0.75)",
    "balance_period": "with --num-blocks: seconds between balance checks, randomized x0.5-1.5 (default 60; 0 = never)",
    "host": "address to listen on (default 127.0.0.1)",
    "port": "TCP port to listen on (default 31330; 0 = any)",
    "public_host": "address to announce instead of the listening one",
    "public_name": "a short display name announced with this server (at most 32 printable characters)",
    "metrics_port": "serve Prometheus /metrics and /health on --host at this port (0 = any free port; default off)",
    "identity": "Ed25519 identity file (created if missing)",
    "initial_peers": "multiaddrs of swarm peers to join through",
    "new_swarm": "start a new swarm instead of joining one",
    "relay": "offer circuit relay v2 reservations (bounded) to nodes behind NAT; for publicly reachable nodes",
    "relay_peers": "behind NAT: relays (multiaddrs) to reserve at first; others are found in the swarm",
    "quant": "quantize the span's Linear layers: none, int8 or nf4",
    "adapters": "LoRA adapters to serve, each NAME=PATH (a peft adapter directory); clients pick one by name",
    "max_cache_tokens": "KV cache budget in tokens (batch x length)",
    "max_batch_size": "largest batch a session may open",
    "max_forward_tokens": "largest batch x tokens of one forward or backward (training) request (backward: at most "
    "4096)",
    "no_batching": "run each session's steps alone, not in forward passes shared with other sessions (for comparison)",
    "torch_threads": "threads of torch's compute pool (default: one per core; give each of several servers on one "
    "machine its share, e.g. 1 per server on 2 cores)",
    "throughput": "announce this throughput (blocks x steps / s) instead of measuring it (measured once, cached)",
    "heartbeat": "seconds between re-announcements",
    "expiry": "seconds an announcement stays valid",
    "step_timeout": "seconds a session may wait between steps",
    "session_timeout": "seconds a session may last",
    "drain_timeout": "seconds open sessions may finish after SIGTERM",
    "log_format": "text or json",
    "log_level": "debug, info, warning or error",
}
SERVING_ONLY = {
    "model",
    "blocks",
    "num_blocks",
    "max_memory",
    "balance_quality",
    "balance_period",
    "quant",
    "adapters",
    "max_cache_tokens",
    "max_batch_size",
    "max_forward_tokens",
    "no_batching",
    "torch_threads",
    "throughput",
    "step_timeout",
    "session_timeout",
    "drain_timeout",
    "public_name",
    "metrics_port",
}


def _add_node_options(parser: argparse.ArgumentParser, serving: bool) -> None:
    from petald.config import NodeConfig

    parser.add_argument("--config", type=Path, help="TOML config file (flags override it, PETALD_* variables too)")
    for field in dataclasses.fields(NodeConfig):
        if field.name in SERVING_ONLY and not serving:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=NODE_OPTIONS_HELP[field.name])
        elif field.type.startswith("list"):
            metavar = "NAME=PATH" if field.name == "adapters" else "MULTIADDR"
            parser.add_argument(flag, nargs="+", metavar=metavar, help=NODE_OPTIONS_HELP[field.name])
        else:
            kind = {"int": int, "float": float}.get(field.type.split(" ")[0], str)
            parser.add_argument(flag, type=kind, help=NODE_OPTIONS_HELP[field.name])


def _run_node(args) -> int:
    import trio

    from petald.config import ConfigError, load_config
    from petald.errors import PetalError
    from petald.node import configure_logging, run_dht_node, run_server

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = load_config(args.config, flags)
        config.check_serving() if args.command == "start" else config.check_swarm()
    except ConfigError as e:
        print(f"petald: {e}", file=sys.stderr)
        return 2
    configure_logging(config)
    try:
        trio.run(run_server if args.command == "start" else run_dht_node, config)
    except (PetalError, OSError) as e:
        print(f"petald: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _monitor(args) -> int:
    from petald.errors import PetalError
    from petald.monitor import run_monitor
    from petald.p2p.host import quiet_libp2p_logs

    if args.refresh <= 0:
        print("petald: --refresh must be more than 0 seconds", file=sys.stderr)
        return 2
    quiet_libp2p_logs()
    try:
        return run_monitor(args.initial_peers, args.host, args.port, args.refresh)
    except (PetalError, OSError) as e:
        print(f"petald: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _model_prepare(parser: argparse.ArgumentParser, args) -> int:
    from petald.errors import PetalError
    from petald.models.checkpoints import prepare_builtin, prepare_gguf

    if (args.gguf is None) == (args.name is None):
        parser.error("give a built-in model name, or --gguf FILE --name NAME")
    if args.gguf is not None and not args.gguf_name:
        parser.error("--gguf needs --name NAME for the converted model")
    try:
        directory = prepare_builtin(args.name) if args.name else prepare_gguf(args.gguf, args.gguf_name)
    except PetalError as e:
        print(f"petald: {e}", file=sys.stderr)
        return 1
    print(directory)
    return 0


def _keygen(args) -> int:
    from petald.p2p.host import IdentityError, load_or_create_identity, peer_id_of, write_identity

    try:
        key_pair = load_or_create_identity(None)
        write_identity(args.out, key_pair)
    except (IdentityError, OSError) as e:
        print(f"petald: {e}", file=sys.stderr)
        return 1
    print(f"identity written to {args.out}", file=sys.stderr)
    print(peer_id_of(key_pair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
