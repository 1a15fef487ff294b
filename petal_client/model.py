"""Models whose transformer blocks run elsewhere: DistributedModelForCausalLM (the client's embeddings and LM
head around them) and DistributedModelForSequenceClassification (a trainable head instead of the LM head).

Both can be prompt-tuned: only the prompts (and a classification head) are trainable, and they stay on
the client; the frozen blocks run forward and backward on the servers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from types import EllipsisType

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from petal_client.generation import BlockSession, Conversation, GenerationError, generate, sampling_processors
from petal_client.local import LocalBlocks
from petal_client.speculative import AssistantDraft, PromptLookupDraft, SpeculativeStats, speculative_generate
from petald.models.checkpoints import checkpoint_dir, swarm_model_name
from petald.models.loading import load_client_parts

TUNING_MODES = (None, "ptune", "deep_ptune")


class PromptTuning(nn.Module):
    """Trainable prompts (P-tuning v2 style): `pre_seq_len` embeddings put before the input tokens, and with
    deep_ptune also a prompt per block, added to those positions' hidden states before each block."""

    def __init__(self, mode: str, pre_seq_len: int, hidden_size: int, num_blocks: int, init_std: float):
        super().__init__()
        if mode not in ("ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if pre_seq_len < 1:
            raise ValueError(f"{mode} needs pre_seq_len >= 1, got {pre_seq_len}")
        self.mode, self.pre_seq_len = mode, pre_seq_len
        self.prefix = nn.Parameter(torch.randn(pre_seq_len, hidden_size) * init_std)
        # zeros: a freshly made deep prompt leaves the model as plain ptune would
        self.deep = nn.Parameter(torch.zeros(num_blocks, 1, pre_seq_len, hidden_size)) if mode == "deep_ptune" else None

    def prepend(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix before `hidden` [B, T, H], and its mask (the prefix is always attended to)."""
        batch = hidden.shape[0]
        prefix = self.prefix.to(hidden.dtype).expand(batch, -1, -1)
        ones = torch.ones(batch, self.pre_seq_len, dtype=attention_mask.dtype)
        return torch.cat([prefix, hidden], dim=1), torch.cat([ones, attention_mask], dim=1)


class DistributedModelForCausalLM(nn.Module):
    """A causal LM whose transformer blocks are `blocks` (remote servers or local spans).

    The client holds only the embeddings, the final norm and the LM head (`parts`), all frozen; with a
    tuning mode, `prompts` holds the trainable prompts."""

    def __init__(
        self,
        parts: nn.Module,
        config: PretrainedConfig,
        tokenizer,
        blocks,
        model_name: str,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
    ):
        super().__init__()
        self.parts = parts.requires_grad_(False)
        self.config = config
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.model_name = model_name
        self.prompts = None
        if tuning_mode is not None:
            self.prompts = PromptTuning(
                tuning_mode,
                pre_seq_len,
                config.hidden_size,
                config.num_hidden_layers,
                getattr(config, "initializer_range", 0.02),
            )
        elif pre_seq_len:
            raise ValueError("pre_seq_len needs a tuning_mode (ptune or deep_ptune)")
        self._active = threading.local()  # the inference session a thread has open: threads do not share one

    @property
    def _conversation(self) -> Conversation | None:
        return getattr(self._active, "conversation", None)

    def close(self) -> None:
        """Leave the swarm (closing this thread's open inference session); the model cannot be used after."""
        if self._conversation is not None:
            self._conversation.close()
        swarm = getattr(self.blocks, "swarm", None)
        if swarm is not None:
            swarm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        initial_peers: list[str],
        *,
        swarm_name: str | None = None,
        server_push: bool = True,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        **kwargs,
    ):
        """Load the client's parts of `model` locally and reach its blocks through the swarm.

        `model` is a built-in name, a local checkpoint directory or a hub id; the swarm knows it as
        `swarm_name` (default: the built-in or hub name, or a directory's last part); the model owns its
        connection to the swarm: `close()` it, or use `with ... as model:`. With `server_push`,
        each server sends its output straight to the next one (the client still gets every output, for
        failover); without, the client visits each server in turn. `tuning_mode` "ptune" or "deep_ptune"
        adds `pre_seq_len` trainable prompts; `active_adapter` runs the blocks with a LoRA adapter that
        servers serve (only those servers are used)."""
        from petal_client.sequential import RemoteSequential
        from petal_client.swarm import Swarm

        model_dir = checkpoint_dir(model)
        parts, config = load_client_parts(model_dir)
        name = swarm_name or swarm_model_name(model)
        swarm = Swarm(initial_peers)
        blocks = RemoteSequential(swarm, name, config.num_hidden_layers, push=server_push, adapter=active_adapter)
        return cls(parts, config, _tokenizer(model_dir), blocks, name, tuning_mode, pre_seq_len, **kwargs)

    @classmethod
    def from_local_spans(
        cls,
        model: str,
        bounds: list[tuple[int, int]],
        quant: str = "none",
        *,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        **kwargs,
    ):
        """The split engine in one process: blocks cut into `bounds` spans, run locally."""
        model_dir = checkpoint_dir(model)
        parts, config = load_client_parts(model_dir)
        blocks = LocalBlocks.load(model_dir, bounds, quant)
        return cls(parts, config, _tokenizer(model_dir), blocks, model, tuning_mode, pre_seq_len, **kwargs)

    def run_blocks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The last block's hidden states [B, T, H] for `input_ids` (the prompts' positions cut off again)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.parts.embed(input_ids)
        if self.prompts is None:
            return self.blocks.forward(hidden, attention_mask)
        hidden, attention_mask = self.prompts.prepend(hidden, attention_mask)
        hidden = self.blocks.forward(hidden, attention_mask, self.prompts.deep)
        return hidden[:, self.prompts.pre_seq_len :]

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[Conversation]:
        """Reserve caches for `max_length` tokens; `generate` calls inside (in this thread) continue one
        conversation. Other threads may open sessions of their own on the same model at the same time."""
        if self._conversation is not None:
            raise RuntimeError("an inference session is already open on this model in this thread")
        if self.prompts is None:
            blocks = self.blocks.inference_session(batch_size, max_length)
        else:
            blocks = PrefixedSession(self.blocks.inference_session(batch_size, max_length + self.prompts.pre_seq_len))
            blocks.prompts, blocks.max_length = self.prompts, max_length
        conversation = Conversation(blocks)
        self._active.conversation = conversation
        try:
            yield conversation
        finally:
            self._active.conversation = None
            conversation.close()

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        streamer=None,
        eos_token_id: int | list[int] | None | EllipsisType = ...,
        generator: torch.Generator | None = None,
        assistant_model: nn.Module | None = None,
        prompt_lookup_num_tokens: int | None = None,
    ) -> torch.Tensor:
        """Generate like transformers: returns the prompt followed by the new tokens, [B, T + new].

        Stops at the model's end-of-sequence token unless `eos_token_id` names others (None: never). With
        `assistant_model` (a local causal LM sharing the tokenizer) or `prompt_lookup_num_tokens` (n-gram drafts
        from the context), decoding is speculative: several tokens per step through the blocks, the same output
        as plain greedy (or the same distribution when sampling); one sequence, in a session of its own."""
        eos = self.config.eos_token_id if eos_token_id is ... else eos_token_id
        if assistant_model is not None or prompt_lookup_num_tokens is not None:
            processors = sampling_processors(temperature, top_k, top_p) if do_sample else None
            return self._speculative(
                input_ids, attention_mask, max_new_tokens, processors, eos, generator, streamer,
                assistant_model, prompt_lookup_num_tokens,
            )  # fmt: skip
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos,
            pad_token_id=self.config.pad_token_id,
            streamer=streamer,
            generator=generator,
        )
        if self._conversation is not None:
            return generate(self.parts, self._conversation, input_ids, attention_mask, **kwargs)
        with self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0]) as conversation:
            return generate(self.parts, conversation, input_ids, attention_mask, **kwargs)

    def _speculative(
        self, input_ids, attention_mask, max_new_tokens, processors, eos, generator, streamer, assistant, lookup
    ) -> torch.Tensor:
        if assistant is not None and lookup is not None:
            raise GenerationError("give assistant_model or prompt_lookup_num_tokens, not both")
        if self._conversation is not None:
            raise GenerationError(
                "speculative decoding runs in a session of its own: call it outside inference_session"
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise GenerationError("speculative decoding takes one unpadded sequence")
        drafter = PromptLookupDraft(lookup) if lookup is not None else AssistantDraft(assistant, processors, generator)
        self.last_speculation = SpeculativeStats()
        with self.inference_session(input_ids.shape[1] + max_new_tokens) as conversation:
            try:
                return speculative_generate(
                    self.parts, conversation.blocks, input_ids, drafter, max_new_tokens=max_new_tokens,
                    processors=processors, eos_token_id=eos, generator=generator, streamer=streamer,
                    stats=self.last_speculation,
                )  # fmt: skip
            finally:
                self.last_speculation.failovers = getattr(conversation.blocks, "failovers", 0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits for every position of `input_ids` (no cache), and with `labels` the next-token loss
        (labels are shifted inside, -100 is ignored: as in transformers)."""
        logits = self.parts.logits(self.run_blocks(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


class DistributedModelForSequenceClassification(DistributedModelForCausalLM):
    """Classifies sequences with a trainable head `score` on the last token's final hidden state (the last
    real token: inputs are left-padded), as transformers' *ForSequenceClassification models do."""

    def __init__(self, *args, num_labels: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_labels = num_labels
        self.score = nn.Linear(self.config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=getattr(self.config, "initializer_range", 0.02))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """Logits [B, num_labels]; with `labels`, cross-entropy (num_labels > 1) or mean squared error (1)."""
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("pad sequences on the left: the last position of every row must be a real token")
        hidden = self.run_blocks(input_ids, attention_mask)[:, -1]
        logits = self.score(self.parts.final_norm(hidden))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PrefixedSession:
    """An inference session whose first step is preceded by the trainable prefix embeddings (and carries the
    deep prompts, which act only on the prefix's positions); the prefix's outputs are cut off again."""

    prompts: PromptTuning
    max_length: int

    def __init__(self, blocks: BlockSession):
        self.blocks = blocks
        self.started = False

    def step(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        if self.started:
            if position is not None:
                position += self.prompts.pre_seq_len  # the caller counts its own tokens, not the prefix
            return self.blocks.step(hidden, attention_mask, position=position)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        hidden, attention_mask = self.prompts.prepend(hidden, attention_mask)
        self.started = True
        output = self.blocks.step(hidden, attention_mask, self.prompts.deep)  # deep prompts: first step only
        return output[:, self.prompts.pre_seq_len :]

    def close(self) -> None:
        self.blocks.close()


def _tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    return tokenizer
