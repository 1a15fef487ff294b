"""A span of transformer blocks from a checkpoint, optionally quantized, run with per-session caches."""

from __future__ import annotations

import functools
import logging
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig

from petald.errors import PetalError, SpanError
from petald.models.loading import load_span_module
from petald.p2p.dht import QUANTS
from petald.serving.adapters import (
    active_adapter,
    attach_adapters,
    check_adapter,
    load_lora_adapter,
    served_adapters,
)
from petald.serving.kv import SessionCache, StepCache, StepRows

NF4_BLOCKSIZE = 64  # values per absmax of an nf4 weight
CHUNK_TOKENS = 1024  # batch x tokens of one job of a long forward pass: bounds its attention memory and its time
T = TypeVar("T")


@dataclass
class SpanSession:
    """The server-side state of one inference session: the KV cache and the padding mask seen so far."""

    cache: SessionCache
    attention_mask: torch.Tensor  # [batch, tokens seen], 1 = real token, 0 = padding
    max_length: int
    layers: slice  # the local layers this session runs: blocks [start, end) of the model
    span_blocks: tuple[int, int]  # the span it was opened on: a server that moved must not run it on others
    adapter: str | None = None  # the LoRA adapter of every step (its cache is valid for that adapter only)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def rewind(self, position: int) -> None:
        """Keep only the first `position` tokens of the cache (e.g. drop rejected draft tokens)."""
        if not 0 <= position <= self.length:
            raise SpanError(f"cannot rewind to position {position}: the session holds {self.length} tokens")
        self.cache.crop(position)
        self.attention_mask = self.attention_mask[:, :position]


@dataclass(frozen=True)
class SessionStep:
    """One step of one session, as the server received it: new tokens' hidden states [B, T, H], their padding mask
    [B, T] (None: no padding), deep prompts (first step only) and the position it builds on (None: all cached)."""

    session: SpanSession
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    position: int | None = None

    @property
    def batch_key(self) -> tuple:
        """Steps with the same key can run as one forward pass: same layers, adapter and number of new tokens."""
        layers = self.session.layers
        return (layers.start, layers.stop, self.session.adapter, self.hidden.shape[1])


class Span:
    """Blocks [start, end) of one model, ready to run on hidden states."""

    def __init__(self, module: nn.Module, config: PretrainedConfig, start: int, end: int, quant: str):
        self.module = module
        self.config = config
        self.start = start
        self.end = end
        self.quant = quant

    @classmethod
    def load(
        cls, model_dir: Path, start: int, end: int, quant: str = "none", adapters: Mapping[str, Path] | None = None
    ) -> Span:
        """Read only blocks [start, end) of `model_dir`; quantize their Linear layers if `quant` says so; serve
        the LoRA `adapters` (name -> peft adapter directory) on them."""
        if quant not in QUANTS:
            raise PetalError(f"unknown quantization {quant!r}: use one of {', '.join(QUANTS)}")
        # quantized block by block: one block's full-precision weights at a time, none of them kept
        prepare = None if quant == "none" else functools.partial(quantize_linears, quant=quant)
        module, config = load_span_module(model_dir, start, end, prepare_block=prepare)
        if adapters:
            attach_adapters(
                module, {name: load_lora_adapter(path, config, start, end) for name, path in adapters.items()}
            )
        module.requires_grad_(False)
        return cls(module, config, start, end, quant)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the LoRA adapters served on this span."""
        return served_adapters(self.module)

    def check_adapter(self, name: str | None) -> None:
        """AdapterError unless `name` is None or an adapter served here."""
        check_adapter(self.module, name)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def new_session(
        self,
        batch_size: int,
        max_length: int,
        start: int | None = None,
        end: int | None = None,
        adapter: str | None = None,
    ) -> SpanSession:
        """A fresh cache for blocks [start, end) of this span (default: all of it), run with LoRA `adapter`."""
        self.check_adapter(adapter)
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise SpanError(f"blocks {start}:{end} are not inside this span, {self.start}:{self.end}")
        layers = slice(start - self.start, end - self.start)
        mask = torch.ones(batch_size, 0, dtype=torch.long)
        cache = SessionCache(end - start, layers.start, max_length)
        return SpanSession(cache, mask, max_length, layers, (self.start, self.end), adapter)

    def step(
        self,
        session: SpanSession,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """Run new tokens `hidden` [B, T, H] through the span, extending the session's cache by T tokens.

        `attention_mask` [B, T] marks padding among the new tokens (default: none). `prompts` [session's
        blocks, B or 1, P, H] are deep prompts for the first P positions: only with a session's first step.
        With `position`, the new tokens follow the first `position` cached ones (the rest is dropped first)."""
        return self.step_batch([SessionStep(session, hidden, attention_mask, prompts, position)])[0]

    def step_batch(self, steps: list[SessionStep]) -> list[torch.Tensor]:
        """Run the steps of several sessions as one forward pass; each session's output, in order.

        The steps must share a batch key (layers, adapter, new tokens); deep prompts go only in a batch of one.
        Each session's cache grows by its own new tokens; a step that fails its checks fails the whole call before
        anything runs, and a failure mid-pass leaves every cache as it was (a retry rewrites the same positions)."""
        if len({step.batch_key for step in steps}) != 1:
            raise SpanError("steps of one batch must run the same layers with the same adapter and new tokens")
        if len(steps) > 1 and any(step.prompts is not None for step in steps):
            raise SpanError("a step with deep prompts runs alone")
        for step in steps:
            self._check_step(step)
        for step in steps:
            if step.position is not None:
                step.session.rewind(step.position)
        masks = [torch.cat([step.session.attention_mask, _mask(step.hidden, step.attention_mask)], 1) for step in steps]
        parts = [StepRows(step.session.cache, mask) for step, mask in zip(steps, masks, strict=True)]
        cache = StepCache(parts, steps[0].hidden.shape[1])
        first = steps[0].session
        hidden = torch.cat([step.hidden.float() for step in steps])
        with torch.inference_mode(), active_adapter(self.module, first.adapter):
            output = self.module(hidden, None, cache, first.layers, steps[0].prompts)
        cache.commit()
        outputs = []
        for step, mask, part in zip(steps, masks, output.split(cache.rows), strict=True):
            step.session.attention_mask = mask
            outputs.append(part)
        return outputs

    def _check_step(self, step: SessionStep) -> None:
        session = step.session
        if session.span_blocks != (self.start, self.end):
            raise SpanError(
                f"this session was opened on blocks {session.span_blocks[0]}:{session.span_blocks[1]}, "
                f"and this server now serves {self.start}:{self.end}: open a new session"
            )
        past = session.length if step.position is None else step.position
        if not 0 <= past <= session.length:
            raise SpanError(f"cannot rewind to position {past}: the session holds {session.length} tokens")
        if step.prompts is not None and past != 0:
            raise SpanError("deep prompts go only with a session's first step")
        if step.hidden.shape[0] != session.batch_size:
            raise SpanError(f"the session has batch size {session.batch_size}, the step {step.hidden.shape[0]}")
        if past + step.hidden.shape[1] > session.max_length:
            length = past + step.hidden.shape[1]
            raise SpanError(f"this step would make the session {length} tokens long, over its max_length")

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """Run a whole sequence through `layers` of the span with no cache (autograd works through it).

        `prompts` [layers, B or 1, P, H] are deep prompts, added to the first P positions before each layer;
        `adapter` names a LoRA adapter served on this span (None: the base weights)."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        with active_adapter(self.module, adapter):
            return self.module(hidden.float(), attention_mask.long(), None, layers, prompts)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. `hidden` and `prompts` of the forward pass's output, given the gradient w.r.t. that
        output: the forward pass is recomputed (nothing is kept between requests)."""
        return run_jobs(self.backward_jobs(hidden, grad_output, attention_mask, layers, prompts, adapter))

    def forward_jobs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> Iterator[torch.Tensor | None]:
        """`forward` without autograd, as jobs the caller runs one by one (other work may run between them): each
        job runs one layer, on the whole sequence or, if it has padding, on at most `chunk_tokens` (batch x tokens)
        of it, attending to the layer's keys so far through a cache of that layer alone. A padded sequence's
        attention then takes chunk x sequence memory, not the sequence x sequence of one pass (a dense mask, and no
        causal fast path). Yields None after each job, then the output."""
        check_adapter(self.module, adapter)
        states = yield from self._layer_states(hidden, attention_mask, layers, prompts, adapter, chunk_tokens, False)
        yield states[-1]

    def backward_jobs(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: slice = slice(None),
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None] | None]:
        """`backward` as jobs: the forward pass as in `forward_jobs`, keeping each layer's input; then, from the
        last layer back, one job per layer that recomputes it with autograd and passes the gradient on, so memory
        holds one layer's graph at a time. Yields None after each job, then (grad hidden, grad prompts)."""
        check_adapter(self.module, adapter)
        mask = _mask(hidden, attention_mask)
        inputs = yield from self._layer_states(hidden, mask, layers, prompts, adapter, chunk_tokens, True)
        grad = grad_output.float()
        local = range(self.num_blocks)[layers]
        grad_prompts: list[torch.Tensor] = []
        for n in reversed(range(len(local))):
            with torch.enable_grad(), active_adapter(self.module, adapter):
                layer_input = inputs[n].requires_grad_(True)
                wanted = [layer_input]
                if prompts is not None:
                    wanted.append(prompts[n : n + 1].detach().float().requires_grad_(True))
                layer_prompts = wanted[1] if prompts is not None else None
                output = self.module(layer_input, mask, None, slice(local[n], local[n] + 1), layer_prompts)
                grads = torch.autograd.grad(output, wanted, grad)
            grad, inputs[n] = grads[0], None  # the layer's input is no longer needed
            grad_prompts[:0] = grads[1:]
            yield None
        yield grad, torch.cat(grad_prompts) if prompts is not None else None

    def _layer_states(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layers: slice,
        prompts: torch.Tensor | None,
        adapter: str | None,
        chunk_tokens: int,
        keep_inputs: bool,
    ) -> Generator[None, None, list[torch.Tensor]]:
        """The output of `layers`, after the input of each of them if `keep_inputs`, computed in chunks (one job
        each)."""
        mask = _mask(hidden, attention_mask)
        batch, length, _ = hidden.shape
        # unpadded, a whole layer is one job: attention takes the causal fast path, in memory linear in the length
        chunk = max(1, chunk_tokens // batch) if not mask.all() else length
        if prompts is not None:
            chunk = max(chunk, prompts.shape[2])  # deep prompts go to the first positions: the first chunk holds them
        states = [hidden.detach().float()]
        for n, index in enumerate(range(self.num_blocks)[layers]):
            cache = self.module.new_cache()  # this layer's keys and values only: freed before the next layer
            layer_prompts = None if prompts is None else prompts[n : n + 1].float()
            outputs = []
            for begin in range(0, length, chunk):
                end = min(begin + chunk, length)
                with torch.no_grad(), active_adapter(self.module, adapter):
                    outputs.append(
                        self.module(
                            states[-1][:, begin:end],
                            mask[:, :end],
                            cache,
                            slice(index, index + 1),
                            layer_prompts if begin == 0 else None,
                        )
                    )
                yield None
            output = torch.cat(outputs, dim=1)
            states = [*states, output] if keep_inputs else [output]
        return states


def _mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(hidden.shape[:2], dtype=torch.long) if attention_mask is None else attention_mask.long()


def run_jobs(jobs: Iterator[T | None]) -> T:
    """Run every job of `jobs` (as from Span.forward_jobs) here and now; the result."""
    return next(result for result in jobs if result is not None)


def quantize_linears(module: nn.Module, quant: str) -> None:
    """Replace every nn.Linear inside `module` by its bitsandbytes int8 or nf4 counterpart, and every MoE experts
    module that `QuantizedExperts` runs by one, in place; those still on the meta device (blocks not loaded yet) are
    left as they are. The new modules hold only the quantized weights: the full-precision ones are dropped with the
    old modules. Experts of another layout stay in full precision (logged once per class)."""
    # bitsandbytes logs a line per call on CPU; nothing in it is actionable for a node operator
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            own = list(child.parameters(recurse=False))
            if any(param.is_meta for param in own):
                continue
            if type(child) is nn.Linear:
                setattr(parent, name, quantized_layer(child.weight.data, child.bias, quant))
            elif is_fused_experts(child):
                setattr(parent, name, QuantizedExperts(child, quant))
            elif any(param.dim() == 3 for param in own):
                _log_unquantized_experts(type(child).__name__)


def quantized_layer(weight: torch.Tensor, bias: torch.Tensor | None, quant: str) -> nn.Module:
    """A bitsandbytes int8 or nf4 layer computing `x @ weight.T + bias` (weight [out, in], full precision), on the
    weight's device; it holds only the quantized weight (and the bias)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    weight = weight.detach()
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif quant == "nf4":
        layer = bnb.nn.LinearNF4(in_features, out_features, bias=bias is not None, compute_dtype=weight.dtype)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
    else:
        raise PetalError(f"cannot quantize to {quant!r}: use int8 or nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.data, requires_grad=False)
    # bitsandbytes picks its CPU kernels by the layer's mode; in training mode (a new module's), int8 layers
    # dequantize the weight and multiply in fp32 and nf4 layers dequantize it for each pass (no repacking for
    # AVX512-BF16): Petal has always run them so, and its measured accuracy (README, Quantization) is theirs.
    # Nothing else of a layer depends on its mode, and no gradient flows into these frozen weights.
    layer.train()
    return layer.to(weight.device)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` is a transformers MoE experts module that `QuantizedExperts` runs: E experts held as 3-D
    parameters `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I], no biases, no norm
    after the experts, the default gating act(gate) * up (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5)."""
    from transformers.integrations.moe import _default_apply_gate

    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    experts, hidden, intermediate = down.shape
    layout = (
        getattr(module, "has_gate", False),
        getattr(module, "is_concatenated", False),
        getattr(module, "is_transposed", True),
        getattr(module, "has_bias", True),
        getattr(module, "has_post_expert_norm", True),
    )
    return (
        layout == (True, True, False, False, False)
        and tuple(gate_up.shape) == (experts, 2 * intermediate, hidden)
        and getattr(type(module), "_apply_gate", None) is _default_apply_gate
        and callable(getattr(module, "act_fn", None))
    )


@functools.cache
def _log_unquantized_experts(class_name: str) -> None:
    logging.getLogger(__name__).warning(
        "%s holds 3-D weights in a layout Petal does not quantize: they stay in full precision", class_name
    )


class QuantizedExperts(nn.Module):
    """The experts of one MoE block with each expert's gate/up and down projections as bitsandbytes int8 or nf4
    layers: computes what the transformers experts module it replaces computes, called as it is called."""

    def __init__(self, experts: nn.Module, quant: str):
        """Quantize every expert of `experts` (an `is_fused_experts` module); its 3-D weights are not kept."""
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_up = nn.ModuleList(quantized_layer(weight, None, quant) for weight in experts.gate_up_proj.data)
        self.down = nn.ModuleList(quantized_layer(weight, None, quant) for weight in experts.down_proj.data)
        self.act_fn = experts.act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """`hidden_states` [tokens, H] through the experts each token selected (`top_k_index` [tokens, k]), their
        outputs weighted by `top_k_weights` [tokens, k] and summed: [tokens, H]."""
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # a slot routed to no local expert
                continue
            tokens, slots = torch.nonzero(top_k_index == expert, as_tuple=True)
            gate, up = self.gate_up[expert](hidden_states[tokens]).chunk(2, dim=-1)
            expert_output = self.down[expert](self.act_fn(gate) * up) * top_k_weights[tokens, slots, None]
            output.index_add_(0, tokens, expert_output.to(output.dtype))
        return output


def quantized_linear_bytes(out_features: int, in_features: int, quant: str) -> int:
    """The bytes of one Linear layer's weight (bias aside) as `quant` stores it: fp32 for "none"; int8: a byte a
    value plus one fp32 scale a row; nf4 (blocks of 64, statistics compressed as bitsandbytes' Params4bit does): half
    a byte a value, a uint8 absmax a block, an fp32 absmax for every 256 of those, and the two code tables."""
    values = out_features * in_features
    if quant == "none":
        return 4 * values
    if quant == "int8":
        return values + 4 * out_features
    if quant == "nf4":
        blocks = -(-values // NF4_BLOCKSIZE)
        return -(-values // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256 + 1)
    raise PetalError(f"unknown quantization {quant!r}: use one of {', '.join(QUANTS)}")


def block_weight_bytes(config: PretrainedConfig, quant: str) -> int:
    """What one block of `config`'s model costs in memory once loaded with `quant`, computed from its parameters'
    shapes (a block built on the meta device: nothing is read or allocated): see `block_bytes`. With several kinds
    of blocks, the largest."""
    from petald.models.loading import num_blocks
    from petald.models.registry import family_for

    family = family_for(config)
    with torch.device("meta"):
        span = family.span_class(config, 0, num_blocks(config))
    return max(block_bytes(block, quant) for block in _blocks(span))


def block_bytes(block: nn.Module, quant: str) -> int:
    """What `block` (full precision, on any device, meta included) costs once `quantize_linears` has quantized it:
    every Linear and every expert's two projections (`is_fused_experts`) as `quant` stores them, the rest (norms,
    biases, MoE routers) in fp32; buffers aside."""
    size = 0
    for module in block.modules():
        quantized = set()
        if type(module) is nn.Linear:
            size += quantized_linear_bytes(module.out_features, module.in_features, quant)
            quantized = {"weight"}
        elif is_fused_experts(module):
            experts, hidden, intermediate = module.down_proj.shape
            per_expert = quantized_linear_bytes(2 * intermediate, hidden, quant)
            per_expert += quantized_linear_bytes(hidden, intermediate, quant)
            size += experts * per_expert
            quantized = {"gate_up_proj", "down_proj"}
        for name, param in module.named_parameters(recurse=False):
            if name not in quantized:
                size += 4 * param.numel()
    return size


def kv_bytes_per_token(config: PretrainedConfig) -> int:
    """What one cached token costs in one block: its key and value, fp32, for every key/value head."""
    heads = config.num_attention_heads
    if config.model_type == "falcon":  # the new decoder architecture caches keys repeated to every head
        kv_heads = heads if config.new_decoder_architecture else 1 if config.multi_query else config.num_kv_heads
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * 4 * kv_heads * head_dim


def blocks_within_memory(block_bytes: int, cache_bytes_per_block: int, max_memory: int) -> int:
    """How many blocks fit in `max_memory` bytes when each takes its weights and its share of the KV cache."""
    return max_memory // (block_bytes + cache_bytes_per_block)


def weight_bytes(module: nn.Module) -> int:
    """The bytes that `module`'s weights hold, measured: every parameter and buffer, and the scales and code
    tables that bitsandbytes keeps beside quantized weights; storages shared by several tensors count once."""
    tensors: dict[int, int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
            storage = tensor.untyped_storage()
            tensors[storage.data_ptr()] = storage.nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        add(getattr(tensor, "SCB", None))  # int8: a scale a row, on the weight until the layer's first pass
        state = getattr(tensor, "quant_state", None)  # nf4: absmax, code, and their nested statistics
        while state is not None:
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    for layer in module.modules():
        state = getattr(layer, "state", None)  # int8, after its first pass: the layer's matmul state holds the scales
        add(getattr(state, "SCB", None))
        add(getattr(state, "CB", None))
    return sum(tensors.values())


def _blocks(span: nn.Module) -> list[nn.Module]:
    """The blocks of a span: the modules of its (first) ModuleList."""
    for module in span.modules():
        if isinstance(module, nn.ModuleList):
            return list(module)
    raise SpanError(f"{type(span).__name__} holds its blocks in no ModuleList")
