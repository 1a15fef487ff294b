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
