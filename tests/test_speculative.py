"""Speculative decoding: the pure rules (prompt lookup, greedy and sampled acceptance), then generation through
local spans and through a real swarm, where it must give plain greedy's tokens in fewer steps."""

from __future__ import annotations

import math

import pytest
import torch

from petal_client.speculative import Draft, accept_greedy, accept_sampled, lookup_continuation


def test_prompt_lookup_proposes_what_followed_the_latest_occurrence_of_the_last_tokens():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_continuation(tokens, 2, 3).tolist() == [7, 8]  # the latest earlier "1 2 3" is followed by 7 8
    assert lookup_continuation([4, 5, 6, 5], 3, 3).tolist() == [6, 5]  # only the 1-gram "5" matches
    assert lookup_continuation([1, 2, 3], 4, 3).tolist() == []  # nothing repeats
    assert lookup_continuation([1, 2, 1, 2], 5, 2).tolist() == [1, 2]  # at most what follows


def test_greedy_acceptance_keeps_the_drafts_the_model_agrees_with_and_adds_its_own_next_token():
    logits = torch.full((4, 10), -1.0)
    for row, token in enumerate([5, 6, 2, 9]):  # the model's argmax after the pending token and each draft
        logits[row, token] = 1.0
    assert accept_greedy(torch.tensor([5, 6, 7]), logits) == (2, 2)  # 5 and 6 kept, 7 rejected: 2 comes instead
    assert accept_greedy(torch.tensor([5, 6, 2]), logits) == (3, 9)  # all kept, and a bonus token
    assert accept_greedy(torch.tensor([4, 6, 2]), logits) == (0, 5)
    assert accept_greedy(torch.zeros(0, dtype=torch.long), logits[:1]) == (0, 5)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def generous_bound(categories: int) -> float:
    """Six standard deviations above the mean of a chi-square with categories - 1 degrees of freedom."""
    df = categories - 1
    return df + 6 * math.sqrt(2 * df)


@pytest.mark.parametrize("draft_kind", ["model", "lookup"])
def test_sampled_acceptance_leaves_the_first_token_distributed_as_the_model_says(draft_kind):
    generator = torch.Generator().manual_seed(5)
    vocab, k, trials = 6, 3, 20000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=generator) * 1.5, dim=-1)  # the model
    q = torch.softmax(torch.randn(k, vocab, generator=generator) * 1.5, dim=-1)  # the draft
    counts = torch.zeros(vocab)
    for _ in range(trials):
        if draft_kind == "model":
            tokens = torch.stack([torch.multinomial(q[i], 1, generator=generator)[0] for i in range(k)])
            draft = Draft(tokens, q)
        else:  # a fixed guess (prompt lookup): a point mass
            draft = Draft(torch.tensor([2, 0, 4]))
        kept, following = accept_sampled(draft, p, generator)
        first = int(draft.tokens[0]) if kept > 0 else following
        counts[first] += 1
    assert chi_square(counts, p[0]) < generous_bound(vocab), (counts / trials, p[0])


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_parts(tiny_llama):
    """The tiny Llama split into 2 local spans, its transformers model, and a differently seeded sibling (a draft
    that is often wrong)."""
    from transformers import AutoModelForCausalLM

    from petal_client.model import DistributedModelForCausalLM
    from petald.models.checkpoints import make_tiny_llama

    local = DistributedModelForCausalLM.from_local_spans(str(tiny_llama), [(0, 3), (3, 6)])
    same = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    other_dir = make_tiny_llama(tiny_llama.parent / "tiny-llama-seed-1", seed=1)
    other = AutoModelForCausalLM.from_pretrained(other_dir).eval()
    return local, same, other


REPEATING = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8]])  # n-grams that prompt lookup can find


@pytest.mark.parametrize("draft", ["itself", "other", "lookup"])
def test_speculative_greedy_through_local_spans_is_plain_greedy(tiny_parts, draft):
    local, same, other = tiny_parts
    plain = local.generate(REPEATING, max_new_tokens=24, eos_token_id=None)
    options = {"itself": {"assistant_model": same}, "other": {"assistant_model": other}}
    options["lookup"] = {"prompt_lookup_num_tokens": 4}
    speculative = local.generate(REPEATING, max_new_tokens=24, eos_token_id=None, **options[draft])
    assert torch.equal(speculative, plain)
    stats = local.last_speculation
    if draft == "itself":  # a perfect draft: every draft is kept, so far fewer steps than tokens
        assert stats.acceptance == 1.0 and stats.steps < 24 / 2
    assert stats.steps <= 24


def test_speculative_sampling_gives_the_models_distribution(tiny_parts):
    """Pairs (first, second) of new tokens sampled with a draft that is often wrong, over many seeded runs, against
    the exact distribution of the model (top-3 sampling keeps it to 9 outcomes)."""
    from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper

    local, same, other = tiny_parts
    prompt = REPEATING[:, :6]
    top3 = LogitsProcessorList([TopKLogitsWarper(3)])
    with torch.no_grad():
        first = torch.softmax(top3(prompt, same(prompt).logits[:, -1]), dim=-1)[0]
        expected = {}
        for a in first.nonzero().flatten().tolist():
            extended = torch.cat([prompt, torch.tensor([[a]])], dim=1)
            second = torch.softmax(top3(extended, same(extended).logits[:, -1]), dim=-1)[0]
            for b in second.nonzero().flatten().tolist():
                expected[(a, b)] = float(first[a] * second[b])
    outcomes = sorted(expected)
    counts = torch.zeros(len(outcomes))
    generator = torch.Generator().manual_seed(1)
    runs = 600
    for _ in range(runs):
        output = local.generate(
            prompt, max_new_tokens=3, do_sample=True, top_k=3, eos_token_id=None, generator=generator,
            assistant_model=other,
        )  # fmt: skip
        counts[outcomes.index((int(output[0, 6]), int(output[0, 7])))] += 1
    probs = torch.tensor([expected[o] for o in outcomes])
    assert chi_square(counts, probs) < generous_bound(len(outcomes)), (counts / runs, probs)


# ---------------------------------------------------------------- through a real swarm


def test_speculative_greedy_through_a_swarm_is_plain_greedy_in_fewer_steps(tiny_llama, tiny_parts, tiny_swarm):
    from petal_client import DistributedModelForCausalLM

    _, same, other = tiny_parts
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [tiny_swarm.addr]) as model:
        plain = model.generate(REPEATING, max_new_tokens=24, eos_token_id=None)
        for options in ({"assistant_model": same}, {"assistant_model": other}, {"prompt_lookup_num_tokens": 4}):
            assert torch.equal(model.generate(REPEATING, max_new_tokens=24, eos_token_id=None, **options), plain)
            assert model.last_speculation.steps <= 24
            if options.get("assistant_model") is same:
                assert model.last_speculation.steps < 24 / 2  # each step through the swarm made several tokens


class KillAfterRejection:
    """A streamer that kills `victims` once, as soon as a round has rejected a draft: the next step is a rewind."""

    def __init__(self, model, victims):
        self.model, self.victims, self.done = model, victims, False

    def put(self, value):
        stats = getattr(self.model, "last_speculation", None)
        if not self.done and stats is not None and stats.drafted > stats.accepted:
            for node in self.victims:
                node.kill()
            self.done = True

    def end(self):
        pass


def test_a_server_killed_right_after_a_rewind_is_replaced_from_the_accepted_history(tiny_llama, tiny_parts, tiny_swarm):
    from petal_client import DistributedModelForCausalLM

    _, _, other = tiny_parts
    # announced 10x faster than the swarm's other servers: routes take them whatever the pings' noise
    fast = ["--throughput", "1000", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
    whole = [
        tiny_swarm.nodes.start(
            "start", "--model", str(tiny_llama), "--blocks", "0:6", "--initial-peers", tiny_swarm.addr, *fast
        )
        for _ in range(2)
    ]  # one hop instead of three: sessions route through one of these, which are then killed
    for node in whole:
        node.wait_serving()
    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [tiny_swarm.addr]) as model:
        plain = model.generate(REPEATING, max_new_tokens=24, eos_token_id=None)
        streamer = KillAfterRejection(model, whole)
        output = model.generate(
            REPEATING, max_new_tokens=24, eos_token_id=None, assistant_model=other, streamer=streamer
        )
        assert streamer.done, "no draft was rejected: nothing was rewound"
        assert model.last_speculation.failovers >= 1, "the session did not run through the killed servers"
        assert torch.equal(output, plain)


def test_a_rewind_past_the_session_or_on_a_closed_session_is_a_clear_error(tiny_llama, tiny_swarm):
    from petal_client import DistributedModelForCausalLM, PetalError
    from petal_client.session import SessionBroken

    with DistributedModelForCausalLM.from_pretrained(str(tiny_llama), [tiny_swarm.addr]) as model:
        session = model.blocks.inference_session(1, 32)
        session.step(model.parts.embed(REPEATING[:, :4]))
        with pytest.raises(PetalError, match="cannot start a step at position 5"):
            session.step(model.parts.embed(REPEATING[:, 4:5]), position=5)
        session.step(model.parts.embed(REPEATING[:, 4:5]), position=2)  # a valid rewind still works after it
        session.close()
        with pytest.raises(SessionBroken, match="was closed"):
            session.step(model.parts.embed(REPEATING[:, :1]), position=0)


def test_petal_generate_with_prompt_lookup_or_a_draft_model_prints_the_plain_answer(tiny_llama, tiny_swarm):
    import subprocess
    import sys

    def petal_generate(*options: str) -> str:
        command = [sys.executable, "-m", "petal_client.generate_cli", "--model", str(tiny_llama)]
        command += ["--initial-peers", tiny_swarm.addr, "--raw", "--max-new-tokens", "16", *options]
        result = subprocess.run([*command, "one two three one two"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    plain = petal_generate()
    assert petal_generate("--prompt-lookup", "4") == plain
    assert petal_generate("--draft-model", str(tiny_llama)) == plain
