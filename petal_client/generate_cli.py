"""`petal-generate`: a prompt in, the model's continuation streamed out, generated through the swarm."""

from __future__ import annotations

import argparse
import sys

from transformers import TextStreamer

from petald.p2p.host import quiet_libp2p_logs


class _StdoutStreamer(TextStreamer):
    """Streams decoded text to stdout as it is generated (only the continuation, flushed per word)."""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        sys.stdout.write(text + ("\n" if stream_end else ""))
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="petal-generate", description="Generate text through a Petal swarm.")
    parser.add_argument("prompt", nargs="?", help="the prompt (omit with --chat)")
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        action="extend",
        required=True,
        metavar="MULTIADDR",
        help="peers to join the swarm through (multiaddrs start with /; a prompt may follow them)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless --temperature)")
    parser.add_argument("--temperature", type=float, help="sample with this temperature")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: keep this much probability mass")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    parser.add_argument("--chat", action="store_true", help="interactive chat that keeps one session")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens reserved for a --chat session")
    speculation = parser.add_mutually_exclusive_group()
    speculation.add_argument(
        "--draft-model",
        metavar="DIR",
        help="speculative decoding with this local draft model (a directory or built-in name sharing the tokenizer)",
    )
    speculation.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="N",
        help="speculative decoding with up to N drafts from the prompt's n-grams",
    )
    args = parser.parse_args(argv)
    # `--initial-peers ADDR "prompt"`: argparse gives the prompt to --initial-peers; multiaddrs start with "/"
    while args.initial_peers and not args.initial_peers[-1].startswith("/") and args.prompt is None:
        args.prompt = args.initial_peers.pop()
    if not args.initial_peers or any(not addr.startswith("/") for addr in args.initial_peers):
        parser.error("--initial-peers takes multiaddrs like /ip4/203.0.113.7/tcp/31330/p2p/12D3Koo…")
    if args.greedy and (args.temperature is not None or args.top_p is not None or args.top_k is not None):
        parser.error("--greedy takes no --temperature, --top-p or --top-k")
    if not args.chat and not args.prompt:
        parser.error("give a PROMPT, or --chat")
    if args.chat and (args.draft_model or args.prompt_lookup):
        parser.error("--draft-model and --prompt-lookup work on one prompt, not with --chat")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        parser.error("--prompt-lookup takes a number of draft tokens >= 1")
    quiet_libp2p_logs()

    from petal_client.model import DistributedModelForCausalLM
    from petald.errors import PetalError

    model = None
    try:
        model = DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers)
        sampling = dict(
            do_sample=args.temperature is not None or args.top_p is not None or args.top_k is not None,
            temperature=args.temperature or 1.0,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
        )
        if args.chat:
            return _chat(model, args, sampling)
        if args.draft_model:
            sampling["assistant_model"] = _draft_model(args.draft_model)
        if args.prompt_lookup:
            sampling["prompt_lookup_num_tokens"] = args.prompt_lookup
        input_ids = _encode(model.tokenizer, [{"role": "user", "content": args.prompt}], args.raw, args.prompt)
        model.generate(
            input_ids, streamer=_StdoutStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling
        )
    except PetalError as e:
        print(f"petal-generate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the step under way was cancelled and the session closed
        print("\npetal-generate: interrupted", file=sys.stderr)
        return 130
    finally:
        if model is not None:
            model.close()
    return 0


def _draft_model(name: str):
    """The whole draft model, run here (it must share the swarm model's tokenizer)."""
    from transformers import AutoModelForCausalLM

    from petald.models.checkpoints import checkpoint_dir

    return AutoModelForCausalLM.from_pretrained(checkpoint_dir(name)).eval()


def _encode(tokenizer, messages: list[dict], raw: bool, prompt: str):
    if raw or tokenizer.chat_template is None:
        return tokenizer(prompt, return_tensors="pt").input_ids
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _chat(model, args, sampling) -> int:
    """One session for the whole conversation: each turn sends only its own new tokens."""
    tokenizer = model.tokenizer
    messages: list[dict] = []
    with model.inference_session(max_length=args.max_length) as conversation:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            input_ids = _turn_ids(tokenizer, messages, line, conversation, args.raw)
            messages.append({"role": "user", "content": line})
            before = 0 if conversation.token_ids is None else conversation.token_ids.shape[1]
            streamer = _StdoutStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            output = model.generate(input_ids, streamer=streamer, **sampling)
            reply = tokenizer.decode(output[0, before + input_ids.shape[1] :], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})


def _turn_ids(tokenizer, messages: list[dict], line: str, conversation, raw: bool):
    """The tokens that this turn adds to the conversation the session already holds."""
    if raw or tokenizer.chat_template is None:
        return tokenizer(("\n" if messages else "") + line, return_tensors="pt", add_special_tokens=False).input_ids
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": line}], tokenize=False, add_generation_prompt=True
    )
    if not messages:
        return tokenizer(full, return_tensors="pt", add_special_tokens=False).input_ids
    # the template of the turns so far, minus the end-of-turn the model itself produced (or did not)
    previous = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
    ended = conversation.token_ids[0, -1].item() == tokenizer.eos_token_id
    if ended and previous.endswith(tokenizer.eos_token):
        previous = previous[: -len(tokenizer.eos_token)]
    new_text = full[len(previous) :] if full.startswith(previous) else full
    if ended:
        new_text = new_text.removeprefix(tokenizer.eos_token)
    return tokenizer(new_text, return_tensors="pt", add_special_tokens=False).input_ids


if __name__ == "__main__":
    sys.exit(main())
