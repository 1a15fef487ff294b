"""Speculative decoding over any chain of blocks whose sessions can rewind (local spans or the swarm).

A cheap draft proposes k tokens; ONE step of the blocks runs the pending token and the k drafts; the longest
prefix the model agrees with is kept, plus the model's own next token, and the rejected drafts are dropped from
every cache by starting the next step at the accepted length (a rewind). Over a network each step crosses
every hop once, so accepted drafts are tokens that cost no crossing.

- Greedy: a draft is kept while it equals the model's argmax: the output is plain greedy's, token for token.
- Sampling: the standard speculative-sampling rule (accept draft x with probability min(1, p(x)/q(x)), else
  sample from max(0, p - q) normalized; after k acceptances sample a bonus token from p), so tokens follow the
  model's own distribution p; a draft without probabilities (prompt lookup) is a point mass q.
- Drafts: `AssistantDraft` (a small causal LM run here, sharing the tokenizer) or `PromptLookupDraft` (n-grams
  of the context; no model). The number of drafts adapts as in transformers' assistant: +2 after a round
  where all were kept, -1 otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import LogitsProcessorList

from petal_client.generation import BlockSession, GenerationError

MAX_DRAFT_TOKENS = 32


@dataclass
class Draft:
    """Proposed next tokens [k] and, for a sampling draft model, the distribution each was drawn from [k, V]."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None


class PromptLookupDraft:
    """Drafts by prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    `max_ngram` down to 1) and propose what followed it."""

    def __init__(self, max_tokens: int, max_ngram: int = 3):
        if max_tokens < 1:
            raise GenerationError(f"prompt_lookup_num_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.max_ngram = max_tokens, max_ngram

    def propose(self, token_ids: torch.Tensor, k: int) -> Draft:
        return Draft(lookup_continuation(token_ids.tolist(), min(k, self.max_tokens), self.max_ngram))


def lookup_continuation(tokens: list[int], k: int, max_ngram: int) -> torch.Tensor:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first; not the tail itself
            if tokens[start : start + n] == tail:
                return torch.tensor(tokens[start + n : start + n + k], dtype=torch.long)
    return torch.zeros(0, dtype=torch.long)


class AssistantDraft:
    """Drafts with a local causal LM (any transformers model sharing the tokenizer): its own cache is kept across
    rounds and cut back to the tokens both agree on."""

    def __init__(self, model: nn.Module, processors: LogitsProcessorList | None, generator: torch.Generator | None):
        self.model = model.eval()
        self.processors = processors  # None: greedy drafts
        self.generator = generator
        self.cache = DynamicCache()
        self.seen: list[int] = []  # the tokens in its cache

    @torch.inference_mode()
    def propose(self, token_ids: torch.Tensor, k: int) -> Draft:
        tokens = token_ids.tolist()
        common = 0
        while common < min(len(tokens), len(self.seen)) and tokens[common] == self.seen[common]:
            common += 1
        common = min(common, len(tokens) - 1)  # the last token is always fed: its logits give the first draft
        if len(self.seen) > common:
            self.cache.crop(common - len(self.seen))  # a negative count: the tokens to drop
        self.seen = tokens[:common]
        feed = token_ids[common:]
        drafts, probs = [], []
        for _ in range(k):
            logits = self.model(feed[None], past_key_values=self.cache, use_cache=True).logits[0, -1].float()
            self.seen += feed.tolist()
            if self.processors is None:
                token = logits.argmax()
            else:
                scores = self.processors(torch.tensor([tokens + [int(t) for t in drafts]]), logits[None])[0]
                p = torch.softmax(scores, dim=-1)
                token = torch.multinomial(p, 1, generator=self.generator)[0]
                probs.append(p)
            drafts.append(token)
            feed = token[None]
        return Draft(
            torch.stack(drafts) if drafts else torch.zeros(0, dtype=torch.long), torch.stack(probs) if probs else None
        )


def accept_greedy(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[int, int]:
    """(how many drafts to keep, the model's next token) given `logits` [k + 1, V] of the step that ran the
    pending token and the k drafts: row i predicts the token after the i-th of them."""
    targets = logits.argmax(dim=-1)
    kept = 0
    while kept < len(drafts) and int(drafts[kept]) == int(targets[kept]):
        kept += 1
    return kept, int(targets[kept])


def accept_sampled(draft: Draft, probs: torch.Tensor, generator: torch.Generator | None) -> tuple[int, int]:
    """The speculative-sampling rule: (drafts kept, next token) given the model's distributions `probs` [k + 1, V]
    (after its logits processors); the kept tokens and the next one are distributed as sampling from `probs`."""
    for i, token in enumerate(draft.tokens.tolist()):
        p = probs[i]
        q = draft.probs[i] if draft.probs is not None else torch.nn.functional.one_hot(torch.tensor(token), len(p))
        q = q.to(p.dtype)
        if torch.rand((), generator=generator) * q[token] < p[token]:  # accept with probability min(1, p / q)
            continue
        residual = torch.clamp(p - q, min=0)
        if residual.sum() <= 0:  # p == q: any rejection is impossible in exact arithmetic; sample from p
            residual = p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator)[0])
    return len(draft.tokens), int(torch.multinomial(probs[len(draft.tokens)], 1, generator=generator)[0])


@dataclass
class SpeculativeStats:
    steps: int = 0  # steps through the blocks (each crosses every hop once)
    drafted: int = 0
    accepted: int = 0
    failovers: int = 0  # servers replaced during the generation (a swarm session's count)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(
    parts: nn.Module,
    session: BlockSession,
    input_ids: torch.Tensor,
    drafter: AssistantDraft | PromptLookupDraft,
    *,
    max_new_tokens: int,
    processors: LogitsProcessorList | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    stats: SpeculativeStats | None = None,
) -> torch.Tensor:
    """Prompt [1, T] followed by up to `max_new_tokens` new tokens, through a fresh `session`; greedy unless
    `processors` is given (then sampled from the processed distribution)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise GenerationError(f"speculative decoding takes one sequence [1, tokens], got {tuple(input_ids.shape)}")
    total = input_ids.shape[1] + max_new_tokens
    if total > session.max_length:
        raise GenerationError(
            f"the sequence would reach {total} tokens, over the session's max_length {session.max_length}"
        )
    stats = stats if stats is not None else SpeculativeStats()
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    tokens = input_ids[0].tolist()
    if streamer is not None:
        streamer.put(input_ids)
    if max_new_tokens == 0:
        return input_ids

    def pick(logits: torch.Tensor, draft: Draft, context: list[int]) -> tuple[int, int]:
        if processors is None:
            return accept_greedy(draft.tokens, logits)
        rows = [
            processors(torch.tensor([context + draft.tokens[:i].tolist()]), logits[i : i + 1].float())[0]
            for i in range(len(logits))
        ]
        return accept_sampled(draft, torch.softmax(torch.stack(rows), dim=-1), generator)

    hidden = session.step(parts.embed(input_ids))  # the prompt; its last position predicts the first token
    stats.steps += 1
    _, first = pick(parts.logits(hidden[0, -1:]).float(), Draft(torch.zeros(0, dtype=torch.long)), tokens)
    new = [first]
    if streamer is not None:
        streamer.put(torch.tensor([first]))
    cached = len(tokens)  # tokens in every cache: the prompt (the pending token `first` is not yet)
    k = 4
    while len(new) < max_new_tokens and new[-1] not in eos:
        room = min(k, max_new_tokens - len(new) - 1, session.max_length - cached - 1, MAX_DRAFT_TOKENS)
        draft = (
            drafter.propose(torch.tensor(tokens + new), room) if room > 0 else Draft(torch.zeros(0, dtype=torch.long))
        )
        step_ids = torch.tensor([[new[-1], *draft.tokens.tolist()]])
        hidden = session.step(parts.embed(step_ids), position=cached)  # drops what the last round rejected
        stats.steps += 1
        kept, following = pick(parts.logits(hidden[0]).float(), draft, tokens + new)
        stats.drafted += len(draft.tokens)
        stats.accepted += kept
        if len(draft.tokens):
            k = k + 2 if kept == len(draft.tokens) else max(1, k - 1)
        cached += 1 + kept  # the pending token and the kept drafts are now valid in every cache
        round_tokens = [*draft.tokens[:kept].tolist(), following]
        for token in round_tokens:
            if len(new) >= max_new_tokens or new[-1] in eos:
                break
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
    if streamer is not None:
        streamer.end()
    return torch.tensor([tokens + new])
