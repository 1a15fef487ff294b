"""Forward and backward passes through the swarm, as one autograd function.

Both are stateless requests: a forward request runs hidden states through a server's blocks, a backward
request sends the same inputs again with the gradient of the output and gets the gradients of the inputs
(the server recomputes). The client keeps every hop's input between the two, so a server that fails in
between is simply replaced: any server (or chain of servers) holding those blocks can answer. Large
batches are cut into chunks that run at once, each on its own route drawn by throughput, so work spreads.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass

import torch
import trio

from petal_client.routing import Hop, throughput_weighted_route
from petal_client.swarm import TRANSPORT_ERRORS, FailureCount, ServerFailure, Swarm, describe, served_name
from petald.errors import PetalError
from petald.p2p.wire import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    BackwardRequest,
    BackwardResult,
    ErrorReply,
    ForwardRequest,
    ForwardResult,
    Limits,
    read_message,
    write_message,
)

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 300.0
MAX_FAILURES = 8  # per forward or backward call
MAX_TOKENS_PER_REQUEST = 4096  # batch x tokens; larger batches are cut into chunks that run in parallel
MAX_REQUESTS_IN_FLIGHT = 4  # servers run one request at a time; more in flight only queue, and load libp2p
# answers that say the request itself is wrong: another server would refuse it too
CALLER_ERRORS = {"bad_request", "bad_shape", "bad_value", "bad_dtype", "too_large", "bad_frame", "unexpected"}


@dataclass
class HopInput:
    """What one server got in a forward pass: enough to ask any server of those blocks for the backward pass."""

    hop: Hop
    hidden: torch.Tensor


class RemoteCalls:
    """Forward and backward requests for blocks [start, end) of `model` (run on the swarm's event loop)."""

    def __init__(
        self,
        swarm: Swarm,
        model: str,
        num_blocks: int,
        start: int,
        end: int,
        adapter: str | None = None,
        rng: random.Random | None = None,
    ):
        self.swarm, self.model, self.num_blocks, self.adapter = swarm, model, num_blocks, adapter
        self.start, self.end = start, end
        self.rng = rng or random.Random()
        self.max_tokens_per_request = MAX_TOKENS_PER_REQUEST
        self.requests: list[Hop] = []  # every request sent, in order (how work spread; tests read it)
        self._in_flight: trio.CapacityLimiter | None = None  # made on the swarm's event loop

    # ---- the two passes, over chunks of the batch

    async def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[list[HopInput]]]:
        """The blocks' output for `hidden` [B, T, H], and the inputs of every hop of every chunk."""
        chunks = self._chunks(hidden.shape[0], hidden.shape[1])
        results: list = [None] * len(chunks)

        async def run(index: int, rows: slice) -> None:
            results[index] = await self._forward_chunk(hidden[rows], mask[rows], _rows(prompts, rows))

        await _run_all(run, chunks)
        return torch.cat([output for output, _ in results]), [inputs for _, inputs in results]

    async def backward(
        self,
        inputs: list[list[HopInput]],
        grad_output: torch.Tensor,
        mask: torch.Tensor,
        prompts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the forward pass's `hidden` and `prompts`, given the gradient w.r.t. its output."""
        chunks = self._chunks(grad_output.shape[0], grad_output.shape[1])
        results: list = [None] * len(chunks)

        async def run(index: int, rows: slice) -> None:
            chunk_prompts = _rows(prompts, rows)
            results[index] = await self._backward_chunk(inputs[index], grad_output[rows], mask[rows], chunk_prompts)

        await _run_all(run, chunks)
        grad_hidden = torch.cat([grad for grad, _ in results])
        if prompts is None:
            return grad_hidden, None
        if prompts.shape[1] == 1:  # one prompt shared by the batch: its gradient sums over every chunk
            return grad_hidden, torch.stack([grad for _, grad in results]).sum(0)
        return grad_hidden, torch.cat([grad for _, grad in results], dim=1)

    def _chunks(self, batch: int, length: int) -> list[slice]:
        rows = max(1, self.max_tokens_per_request // max(length, 1))
        return [slice(first, min(first + rows, batch)) for first in range(0, batch, rows)]

    # ---- one chunk

    async def _forward_chunk(
        self, hidden: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[HopInput]]:
        inputs: list[HopInput] = []
        block, failures = self.start, FailureCount(self.swarm.banned, MAX_FAILURES)
        while block < self.end:
            hop = (await self._route(block, self.end))[0]  # drawn hop by hop: a failure re-draws from here
            try:
                reply = await self._request(hop, FORWARD_PROTOCOL, self._forward_request(hop, hidden, mask, prompts))
            except ServerFailure as failure:
                log.warning("%s; routing around it", failure)
                failures.record(failure)
                continue
            inputs.append(HopInput(hop, hidden))
            hidden, block = reply.hidden, hop.end
        return hidden, inputs

    async def _backward_chunk(
        self, inputs: list[HopInput], grad: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        failures = FailureCount(self.swarm.banned, MAX_FAILURES)
        for record in reversed(inputs):
            hop = record.hop
            preferred = [hop]  # the server that ran the forward pass, unless it failed since
            while True:
                route = preferred or await self._route(hop.start, hop.end)
                try:
                    grad, hop_grad_prompts = await self._backward_route(route, record.hidden, grad, mask, prompts)
                    break
                except ServerFailure as failure:
                    log.warning("%s; routing around it", failure)
                    failures.record(failure)
                    preferred = []
            if grad_prompts is not None:
                grad_prompts[hop.start - self.start : hop.end - self.start] += hop_grad_prompts
        return grad, grad_prompts

    async def _backward_route(
        self,
        route: list[Hop],
        hidden: torch.Tensor,
        grad: torch.Tensor,
        mask: torch.Tensor,
        prompts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backward through `route`; a route of several servers (a replacement) first runs forward to get
        the inputs of its later hops."""
        hop_inputs = [hidden]
        for hop in route[:-1]:
            reply = await self._request(
                hop, FORWARD_PROTOCOL, self._forward_request(hop, hop_inputs[-1], mask, prompts)
            )
            hop_inputs.append(reply.hidden)
        grads_prompts = []
        for hop, hop_input in reversed(list(zip(route, hop_inputs, strict=True))):
            request = self._forward_request(hop, hop_input, mask, prompts)
            backward = BackwardRequest(**vars(request), grad_output=grad)
            reply = await self._request(hop, BACKWARD_PROTOCOL, backward)
            grad = reply.grad_hidden
            grads_prompts.insert(0, reply.grad_prompts)
        return grad, torch.cat(grads_prompts) if prompts is not None else None

    # ---- requests

    def _forward_request(
        self, hop: Hop, hidden: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor | None
    ) -> ForwardRequest:
        hop_prompts = None if prompts is None else prompts[hop.start - self.start : hop.end - self.start]
        return ForwardRequest(self.model, hop.start, hop.end, hidden, mask, hop_prompts, self.adapter)

    async def _route(self, start: int, end: int) -> list[Hop]:
        """A throughput-weighted route through [start, end) over usable servers."""
        choose = functools.partial(
            throughput_weighted_route, start=start, end=end, rng=self.rng, model=served_name(self.model, self.adapter)
        )
        route, _ = await self.swarm.route(self.model, self.num_blocks, self.adapter, choose)
        return route

    async def _request(self, hop: Hop, protocol: str, request: ForwardRequest):
        """Send one request to the server of `hop`; ServerFailure if it fails or refuses for its own reasons."""
        self.requests.append(hop)
        status = (await self.swarm.watch(self.model, self.num_blocks)).servers.get(hop.peer_id)
        if status is None:
            raise ServerFailure(hop.peer_id, "gone from the swarm")
        expect = BackwardResult if isinstance(request, BackwardRequest) else ForwardResult
        if self._in_flight is None:
            self._in_flight = trio.CapacityLimiter(MAX_REQUESTS_IN_FLIGHT)
        async with self._in_flight:
            try:
                stream = await self.swarm.open_stream(status, protocol)
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        await write_message(stream, request)
                        reply = await read_message(stream, Limits(), expect=(expect,))
                finally:
                    with trio.move_on_after(5):
                        await stream.close()
            except TRANSPORT_ERRORS as e:
                raise ServerFailure(hop.peer_id, f"{request.TYPE} request: {describe(e)}") from e
        if isinstance(reply, ErrorReply):
            if reply.code in CALLER_ERRORS:
                raise PetalError(f"server {hop.peer_id[:16]}… refused a {request.TYPE} request: {reply.reason}")
            raise ServerFailure(hop.peer_id, reply.reason, reply.code)
        wanted = request.hidden.shape
        got = reply.hidden.shape if isinstance(reply, ForwardResult) else reply.grad_hidden.shape
        if got != wanted:
            raise ServerFailure(hop.peer_id, f"answered with shape {list(got)}, not {list(wanted)}")
        return reply


async def _run_all(run, chunks: list[slice]) -> None:
    """`run(index, rows)` for every chunk at once; the first failure is raised as itself (not in a group)."""
    try:
        async with trio.open_nursery() as nursery:
            for index, rows in enumerate(chunks):
                nursery.start_soon(run, index, rows)
    except BaseExceptionGroup as group:
        first = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group


def _rows(prompts: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The prompts of a chunk of the batch: per-row prompts are cut, a shared one [L, 1, P, H] is kept."""
    if prompts is None or prompts.shape[1] == 1:
        return prompts
    return prompts[:, rows]


class RemoteBlocksFunction(torch.autograd.Function):
    """hidden (and deep prompts) -> the output of remote blocks, differentiable through the swarm."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, mask: torch.Tensor, calls: RemoteCalls):
        prompts = None if prompts is None else prompts.detach()
        output, inputs = calls.swarm.run(calls.forward, hidden.detach(), mask, prompts)
        ctx.calls, ctx.inputs, ctx.mask, ctx.prompts = calls, inputs, mask, prompts
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        calls: RemoteCalls = ctx.calls
        grad_hidden, grad_prompts = calls.swarm.run(
            calls.backward, ctx.inputs, grad_output.contiguous(), ctx.mask, ctx.prompts
        )
        return grad_hidden, grad_prompts, None, None
