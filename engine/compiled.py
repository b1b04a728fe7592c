"""Compiled steps: torch.compile and AOTInductor around the model's step (engine/model.py), for serving and training.

What dominates on a CPU is dispatching small ops: a one-row decode step is hundreds of them and a memory chunk
dozens, which a compiled graph fuses. So two steps are compiled (compile_steps): the decode step (one row per
session, single_row_step) and prefill's whole-chunk memory step (read_and_update). The rest of prefill (dense
projections, attention over many rows) stays eager. Training compiles its own chunk step, differentiated through
(compile_training_steps). AotDecode exports the one-session decode step that ends no memory chunk with
torch.export and compiles it with AOTInductor: a C++ runner without dynamo's guards and inductor's Python wrapper.

Dynamo keeps compiled graphs on the code object it compiled, so each model compiles private copies of the steps'
code (_private_copy): two models never share a graph, nor one model's recompile budget.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from kernels.memory.naive import read_and_update

from .state import ModelState, flatten_state, nest_state, write_into
from .step import StepContext


def _private_copy(function: types.FunctionType, owner: int) -> types.FunctionType:
    """The same function on a copy of its code object (dynamo caches compiled graphs per code object)."""
    code = function.__code__
    code = code.replace(co_name=f"{code.co_name}_{owner:x}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


def compile_chunk_step(owner: int):
    """read_and_update through torch.compile, on a private copy of its code (see _private_copy) for owner.

    A slice of a step's rows has strides that depend on the step's length: the inputs are made contiguous, so
    that there is one graph per batch size instead of one per step length.
    """
    compiled = torch.compile(_private_copy(read_and_update, owner))

    def chunk_step(weights, momentum, q, k, v, theta, coefficients, eps, grad_clip, in_place=False):
        def dense(tensors):
            return [t.contiguous() for t in tensors]

        # never in place: a compiled graph that writes into its inputs copies them back whole
        return compiled(dense(weights), dense(momentum), *dense((q, k, v, theta)), tuple(dense(coefficients)), eps,
                        grad_clip)

    return chunk_step


def single_row_step(model, tokens: Tensor, state: ModelState, pos: Tensor, count: Tensor,
                    rope: tuple[Tensor, Tensor], any_full: bool, any_segment_end: bool) -> Tensor:
    """Titans.step for one row per session, from tensors and flags only: what compile_steps compiles. The host
    positions stay out of it, so one graph serves every position (two or three graphs in all: with and without a
    chunk end / segment end). RoPE's cos/sin come in computed: inside the graph inductor would recompute them for
    every key the query meets (it lowers a one-row bmm to an inlined mul + sum).

    The state is updated in place and only the logits come back: returning a tensor the graph also mutates makes
    it copy the whole tensor (every attention ring, every step) instead of writing one row.
    """
    ctx = StepContext(pos, count, 1, any_full, any_segment_end, model.cfg, None, owned=True)
    ctx._cache[("rope", rope[0].dtype)] = rope
    logits, new, _ = model.step(tokens, state, ctx)
    write_into(state, new)
    return logits


def compile_steps(model) -> None:
    """Set model.decode_step and each memory's compiled_chunk_step (the steps the planner, engine/step.py, takes
    when they are set). The Engine freezes the parameters and the config, so the guards on the module are dropped
    (checking them cost more than the step itself): each call checks only the step's inputs. Compiling takes
    seconds to a minute per graph the first time (inductor caches on disk), and needs a C++ compiler on a CPU."""
    model.decode_step = torch.compile(
        types.MethodType(_private_copy(single_row_step, id(model)), model),
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    chunk_step = compile_chunk_step(id(model))
    for memory in model.memories():
        memory.compiled_chunk_step = chunk_step


def compile_training_steps(model) -> None:
    """Prefill's whole-chunk memory step through torch.compile when gradients flow through it (training), fused
    forward and backward over the chunk's small ops. Serving steps keep their own graphs (compile_steps)."""
    chunk_step = compile_chunk_step(id(model) + 1)  # code of its own: dynamo caches graphs per code object
    for memory in model.memories():
        memory.compiled_training_step = chunk_step


class AotDecode:
    """One session's decode step that ends no memory chunk (all but one step in chunk_size), compiled ahead of
    time into `directory` (decode_step.pt2); called as model.aot_decode(tokens, state, ctx) -> logits [1, 1, V],
    the state updated in place. state: a one-session batched state to trace with (not modified). The other steps
    keep the torch.compile graphs of compile_steps."""

    def __init__(self, model, state: ModelState, directory: str):
        flat = flatten_state(state)
        self.names = sorted(flat)
        self.dtype = model.embed.weight.dtype
        names = self.names

        class Step(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, tokens, pos, count, cos, sin, *tensors):
                nested = nest_state(dict(zip(names, tensors, strict=True)))
                return single_row_step(self.model, tokens, nested, pos, count, (cos, sin), False, False)

        ctx = StepContext.build([1], [1], model.cfg, model.embed.weight.device)  # the position is an input
        cos, sin = ctx.rope(self.dtype)
        example = (torch.zeros(1, 1, dtype=torch.long, device=ctx.pos.device), ctx.pos, ctx.count, cos, sin,
                   *[flat[n].clone() for n in names])
        exported = torch.export.export(Step().eval(), example, strict=False)
        package = torch._inductor.aoti_compile_and_package(exported, package_path=f"{directory}/decode_step.pt2")
        self.runner = torch._inductor.aoti_load_package(package)
        self._inputs: tuple[ModelState, list[Tensor]] | None = None  # the last state and its tensors, in names' order

    def __call__(self, tokens: Tensor, state: ModelState, ctx: StepContext) -> Tensor:
        if self._inputs is None or self._inputs[0] is not state:  # a batch's live state stays one object per member
            flat = flatten_state(state)
            self._inputs = (state, [flat[n] for n in self.names])
        cos, sin = ctx.rope(self.dtype)
        logits = self.runner(tokens, ctx.pos, ctx.count, cos, sin, *self._inputs[1])
        return logits[0] if isinstance(logits, (list, tuple)) else logits


class GraphDecode:
    """A batch's one-token decode step replayed from CUDA graphs (vLLM's approach), over the batch's pool of slots.

    One graph per bucket of batch sizes (powers of two up to the pool's capacity), captured over the pool's leading
    slots with static inputs: n sessions run the smallest bucket that holds them, and the rows past n count 0 (their
    slots are free: nothing in them is read by the live rows, and nothing is written). A graph runs single_row_step
    with both host flags set, so the device masks say which sessions end a memory chunk or a MAC segment: one graph
    per bucket serves every step, and a step costs the host a few small copies and one replay, no sync.

    pool: the batch's flat state tensors [capacity, ...], which must stay where they are (a pool that grows makes
    new tensors: the batch then builds a new GraphDecode). capture=False runs the same function on the same static
    buffers without capturing (the CPU's case: tests compare it with the plain step).
    """

    def __init__(self, model, pool: dict[str, Tensor], capture: bool):
        self.model, self.capture = model, capture
        self.pool = pool
        self.capacity = next(iter(pool.values())).shape[0]
        self.device = next(iter(pool.values())).device
        self.dtype = model.embed.weight.dtype
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, dict[str, Tensor]]] = {}
        self.memory_pool = torch.cuda.graph_pool_handle() if capture else None  # one pool for every bucket's graph

    def bucket(self, sessions: int) -> int:
        if not 0 < sessions <= self.capacity:
            raise ValueError(f"{sessions} sessions for a pool of {self.capacity}")
        return min(self.capacity, 1 << (sessions - 1).bit_length())

    def _run(self, io: dict[str, Tensor]) -> None:
        bucket = io["tokens"].shape[0]
        state = nest_state({k: v[:bucket] for k, v in self.pool.items()})
        ctx = StepContext(io["pos"], io["count"], 1, True, True, self.model.cfg, None, owned=True)
        io["logits"].copy_(single_row_step(self.model, io["tokens"], state, io["pos"], io["count"],
                                           ctx.rope(self.dtype), True, True))

    def _make(self, bucket: int) -> tuple[torch.cuda.CUDAGraph | None, dict[str, Tensor]]:
        io = {"tokens": torch.zeros(bucket, 1, dtype=torch.long, device=self.device),
              "pos": torch.zeros(bucket, dtype=torch.long, device=self.device),
              "count": torch.zeros(bucket, dtype=torch.long, device=self.device),  # all padding: nothing changes
              "logits": torch.empty(bucket, 1, self.model.cfg.vocab_size, dtype=self.dtype, device=self.device)}
        if not self.capture:
            return None, io
        stream = torch.cuda.Stream(self.device)  # warm up (Triton's compiles, allocator) outside the capture
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(io)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            self._run(io)
        return graph, io

    def buckets(self) -> list[int]:
        """The batch sizes graphs are captured at: powers of two below the capacity, and the capacity."""
        return sorted({1 << i for i in range(self.capacity.bit_length()) if 1 << i < self.capacity} | {self.capacity})

    def prepare(self) -> None:
        """Capture every bucket's graph now (at start-up) rather than at the first step that needs it (in someone's
        request)."""
        for bucket in self.buckets():
            if bucket not in self.graphs:
                self.graphs[bucket] = self._make(bucket)

    def __call__(self, tokens: Tensor, positions: list[int]) -> Tensor:
        """tokens [n, 1] of the sessions in slots 0..n-1, at `positions` -> logits [n, 1, V]; the slots updated in
        place."""
        n = tokens.shape[0]
        bucket = self.bucket(n)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._make(bucket)
        graph, io = self.graphs[bucket]
        io["tokens"][:n].copy_(tokens)
        io["pos"][:n].copy_(torch.tensor(positions), non_blocking=True)
        io["count"][:n].fill_(1)
        io["count"][n:].fill_(0)
        if graph is None:
            self._run(io)
        else:
            graph.replay()
        return io["logits"][:n].clone()  # the next step overwrites the buffer
