"""A swarm client for the NAT tests, run inside a network namespace: greedy generation, paused at one step.

Usage: python tests/nat_client_script.py MODEL_DIR INITIAL_PEER PROMPT_IDS NEW_TOKENS [PAUSE_AT]
PROMPT_IDS is a JSON list. With PAUSE_AT it prints {"paused": PAUSE_AT} when that token arrives and waits for a
line on stdin before going on. At the end it prints {"tokens": [...], "failovers": n, "route": [peer ids]}.
"""

from __future__ import annotations

import json
import sys

import torch

from petal_client.model import DistributedModelForCausalLM


class PauseAt:
    def __init__(self, step: int | None):
        self.step, self.seen = step, 0

    def put(self, value) -> None:
        if self.seen == self.step:
            print(json.dumps({"paused": self.step}), flush=True)
            sys.stdin.readline()
        self.seen += 1

    def end(self) -> None:
        pass


def main() -> None:
    model_dir, peer, prompt, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    pause_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
    with DistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=[peer]) as model:
        with model.inference_session(max_length=64) as session:
            output = model.generate(
                torch.tensor([prompt]), max_new_tokens=new_tokens, eos_token_id=None, streamer=PauseAt(pause_at)
            )
            route = [hop.hop.peer_id for hop in session.blocks.route]
            failovers = session.blocks.failovers
    print(json.dumps({"tokens": output[0].tolist(), "failovers": failovers, "route": route}), flush=True)


if __name__ == "__main__":
    main()
