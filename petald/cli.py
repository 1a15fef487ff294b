"""`petald`: start a node, run a bootstrap DHT node, make an identity, inspect the swarm, prepare models."""

from __future__ import annotations

import argparse
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
    prepare.add_argument("--gguf", type=Path, help="a Llama-family GGUF file to convert")
    prepare.add_argument("--name", dest="gguf_name", help="the name to give the converted --gguf model")

    keygen = commands.add_parser("keygen", help="write a new Ed25519 node identity and print its peer id")
    keygen.add_argument("--out", type=Path, required=True, help="where to write the key (mode 0600, never overwritten)")

    args = parser.parse_args(argv)
    if args.command == "model":
        return _model_prepare(parser, args)
    if args.command == "keygen":
        return _keygen(args)
    parser.error(f"unknown command {args.command}")
    return 2


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
