"""One model as petal-api serves it: prompts to token ids, and generations over the swarm, each in its own
inference session and worker thread, given out as pieces of text while they are made."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import torch
from torch import nn

from petal_client.api.decoding import TokenText
from petal_client.generation import Conversation, generate, sampling_processors
from petal_client.model import DistributedModelForCausalLM
from petal_client.routing import missing_blocks
from petal_client.speculative import AssistantDraft, PromptLookupDraft, speculative_generate
from petal_client.swarm import usable_servers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """New text of the answer."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The end of an answer: why it ended and what it took."""

    reason: str  # "stop" (end of sequence or a stop sequence) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    servers: int  # distinct servers that ran a step of it
    failovers: int


class _Cancelled(Exception):
    """The caller went away: stop generating."""


class _StopSequence(Exception):
    """A stop sequence appeared: stop generating."""


class ServedModel:
    """A model whose embeddings and head this process holds; its blocks run on the swarm."""

    def __init__(self, model: DistributedModelForCausalLM, draft: nn.Module | None = None, prompt_lookup: int = 0):
        self.model = model
        self.name = model.model_name
        self.tokenizer = model.tokenizer
        self.swarm = model.blocks.swarm
        self.num_blocks = model.config.num_hidden_layers
        self.context_length = model.config.max_position_embeddings
        self.draft, self.prompt_lookup = draft, prompt_lookup  # speculative decoding: a server-side setting

    @classmethod
    def load(cls, model: str, initial_peers: list[str], draft_model: str = "", prompt_lookup: int = 0) -> ServedModel:
        draft = None
        if draft_model:
            from transformers import AutoModelForCausalLM

            from petald.models.checkpoints import checkpoint_dir

            draft = AutoModelForCausalLM.from_pretrained(checkpoint_dir(draft_model)).eval()
        return cls(
            DistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers), draft, prompt_lookup
        )

    def close(self) -> None:
        self.swarm.close()

    # ---- prompts

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of `messages` in the model's chat template, ending with the assistant's turn."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    # ---- the swarm

    async def missing_blocks(self) -> list[tuple[int, int]]:
        """The block ranges no usable server covers now, as the client's live view of the swarm sees it."""
        return await anyio.to_thread.run_sync(self.swarm.run, self._missing_blocks)

    async def _missing_blocks(self) -> list[tuple[int, int]]:
        view = await self.swarm.watch(self.name, self.num_blocks)
        usable = usable_servers(view, self.swarm.banned, None)
        return missing_blocks([status.span() for status in usable.values()], 0, self.num_blocks)

    async def list_swarm_models(self) -> dict[str, int]:
        """Every model announced in the swarm's model index: name -> number of blocks."""
        return await anyio.to_thread.run_sync(self.swarm.run, self.swarm.dht.list_models)

    # ---- generation

    async def generate(
        self, prompt_ids: list[int], sampling: Sampling, on_done: Callable[[], None]
    ) -> AsyncIterator[Piece | Finish]:
        """Pieces of the answer to `prompt_ids` as they are made, then a Finish; errors of the swarm are raised.

        The generation runs in a worker thread in its own inference session. Closing this iterator early
        (the HTTP client went away) stops it after the step in flight, and the servers free their caches.
        `on_done` is called on this event loop once the worker has finished and closed its session."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | Finish | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Piece | Finish | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._generate(prompt_ids, sampling, emit, cancelled)
            finally:
                try:
                    loop.call_soon_threadsafe(on_done)
                except RuntimeError:  # the event loop is closed: the process is shutting down
                    pass

        threading.Thread(target=work, name=f"petal-api-{self.name}", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            cancelled.set()

    def _generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        emit: Callable[[Piece | Finish | BaseException], None],
        cancelled: threading.Event,
    ) -> None:
        """Run one generation to its end (in a worker thread), emitting what `generate` gives out."""
        session = self.model.blocks.inference_session(1, len(prompt_ids) + sampling.max_new_tokens)
        conversation = Conversation(session)
        streamer = _Streamer(TokenText(self.tokenizer, list(sampling.stop)), session, emit, cancelled)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed % 2**64)
        eos = self.model.config.eos_token_id
        try:
            if self.draft is not None or self.prompt_lookup:
                greedy = sampling.temperature <= 0
                processors = None if greedy else sampling_processors(sampling.temperature, None, sampling.top_p)
                if self.draft is not None:
                    drafter = AssistantDraft(self.draft, processors, generator)
                else:
                    drafter = PromptLookupDraft(self.prompt_lookup)
                speculative_generate(
                    self.model.parts,
                    session,
                    torch.tensor([prompt_ids]),
                    drafter,
                    max_new_tokens=sampling.max_new_tokens,
                    processors=processors,
                    eos_token_id=eos,
                    generator=generator,
                    streamer=streamer,
                )
            else:
                generate(
                    self.model.parts,
                    conversation,
                    torch.tensor([prompt_ids]),
                    max_new_tokens=sampling.max_new_tokens,
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature or 1.0,
                    top_p=sampling.top_p,
                    eos_token_id=eos,
                    pad_token_id=self.model.config.pad_token_id,
                    streamer=streamer,
                    generator=generator,
                )
            tail = streamer.text.flush()
            if tail:
                emit(Piece(tail))
            ended = streamer.tokens and streamer.last_token in ([eos] if isinstance(eos, int) else eos or [])
            reason = "stop" if ended else "length"
        except _StopSequence:
            reason = "stop"
        except _Cancelled:
            return
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers with it
            emit(e)
            return
        finally:
            try:
                conversation.close()
            except Exception as e:  # noqa: BLE001 - the servers drop a session whose client is gone anyway
                log.warning("closing the inference session of %s failed: %r", self.name, e)
        emit(Finish(reason, len(prompt_ids), streamer.tokens, len(streamer.servers), session.failovers))


class _Streamer:
    """Receives each new token from `generate` (in its thread): gives out the text it finalizes, and stops
    generation by raising when the request went away or a stop sequence appeared."""

    def __init__(self, text: TokenText, session, emit: Callable, cancelled: threading.Event):
        self.text, self.session, self.emit, self.cancelled = text, session, emit, cancelled
        self.prompt_seen = False
        self.tokens = 0
        self.last_token: int | None = None
        self.servers: set[str] = set()

    def put(self, ids: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        self.servers.update(span.hop.peer_id for span in self.session.route)
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.tokens += 1
        self.last_token = int(ids[0])
        piece = self.text.add(self.last_token)
        if piece:
            self.emit(Piece(piece))
        if self.text.stopped:
            raise _StopSequence

    def end(self) -> None:
        pass
