"""The Titans memory states of every slot, and one step's pass of each memory layer over them.

Per memory layer and slot the pool holds the memory MLP's weights and momentum (float32, at the
sequence's last memory-chunk boundary) and the inputs of the chunk being filled (the tokens
since that boundary). Within a step:

- a decode writes its input into the chunk being filled, retrieves from the slot's weights, and
  when its token completes the chunk, the chunk is stored (one parallel update); decodes of the
  step are batched: one gather of their weights, one retrieval, one update for those completing;
- a prefill span (or a chunk of one) runs the memory over the pending inputs and its own tokens
  from the slot's state: whole chunks are stored, the remainder becomes the pending inputs.

So a sequence's outputs do not depend on how its tokens were split into steps or batched.

Legend: N slots, T tokens in the step, D decodes, E hidden size, C memory chunk, h heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raycake.model.titans import MemoryState, NeuralMemory


@dataclass
class LayerStates:
    """One memory layer's states, every slot."""

    weights: tuple[torch.Tensor, ...]  # per memory-MLP layer: [N, h, d_in, d_out]
    momentum: tuple[torch.Tensor, ...]  # same shapes
    pending: torch.Tensor  # [N, C, E] inputs since the last chunk boundary (first p % C rows)

    def gather(self, slots: torch.Tensor) -> MemoryState:
        return MemoryState(
            tuple(w.index_select(0, slots) for w in self.weights),
            tuple(m.index_select(0, slots) for m in self.momentum),
        )

    def scatter(self, slots: torch.Tensor, state: MemoryState) -> None:
        for dest, src in zip(self.weights, state.weights, strict=True):
            dest.index_copy_(0, slots, src)
        for dest, src in zip(self.momentum, state.momentum, strict=True):
            dest.index_copy_(0, slots, src)


def memory_state_bytes_per_slot(memories: dict[int, NeuralMemory], dtype: torch.dtype) -> int:
    """Bytes one sequence's memory state takes: float32 weights and momentum, and the pending
    chunk's inputs in the model's ``dtype``."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for memory in memories.values():
        config = memory.config
        total += 4 * config.state_numel() + element * config.chunk_size * config.hidden_size
    return total


class MemoryStatePool:
    """Every slot's memory state, for each memory layer of a Titans model."""

    def __init__(
        self,
        memories: dict[int, NeuralMemory],
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.memories = memories
        self.num_slots = num_slots
        self.device = device
        # Every memory layer of a model is built from one config: one chunk size.
        (self.chunk_size,) = {m.config.chunk_size for m in memories.values()}
        self.layers: dict[int, LayerStates] = {}
        for index, memory in memories.items():
            config = memory.config
            shapes = [(num_slots, config.num_heads, i, o) for i, o in config.layer_shapes()]
            self.layers[index] = LayerStates(
                weights=tuple(torch.zeros(s, device=device) for s in shapes),
                momentum=tuple(torch.zeros(s, device=device) for s in shapes),
                # The layer's inputs, in the model's dtype: kept exactly as they came.
                pending=torch.zeros(
                    num_slots, config.chunk_size, config.hidden_size, dtype=dtype, device=device
                ),
            )

    @torch.inference_mode()
    def reset(self, slot: int) -> None:
        """A fresh sequence: every memory at its learned initial weights, no momentum."""
        index = torch.tensor([slot], device=self.device)
        for layer, states in self.layers.items():
            states.scatter(index, self.memories[layer].initial_state(1, device=self.device))
            states.pending[slot].zero_()

    @torch.inference_mode()
    def copy(self, src: int, dst: int) -> None:
        """Start ``dst`` from the snapshot in ``src`` (taken at a chunk boundary)."""
        for states in self.layers.values():
            for tensor in (*states.weights, *states.momentum):
                tensor[dst].copy_(tensor[src])
            states.pending[dst].zero_()

    @torch.inference_mode()
    def read(self, slot: int, num_tokens: int) -> dict[str, torch.Tensor]:
        """A copy of a sequence's whole state after ``num_tokens`` tokens, by tensor name
        (``layers.{i}.weights.{j}``, ``.momentum.{j}``, ``.pending``: only its live rows)."""
        out: dict[str, torch.Tensor] = {}
        for layer, states in self.layers.items():
            for j, (w, m) in enumerate(zip(states.weights, states.momentum, strict=True)):
                out[f"layers.{layer}.weights.{j}"] = w[slot].clone()
                out[f"layers.{layer}.momentum.{j}"] = m[slot].clone()
            live = num_tokens % states.pending.shape[1]
            out[f"layers.{layer}.pending"] = states.pending[slot, :live].clone()
        return out

    def expected_shapes(self, num_tokens: int) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor ``read`` returns after ``num_tokens`` tokens."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer, states in self.layers.items():
            for j, w in enumerate(states.weights):
                shapes[f"layers.{layer}.weights.{j}"] = tuple(w.shape[1:])
                shapes[f"layers.{layer}.momentum.{j}"] = tuple(w.shape[1:])
            chunk, hidden = states.pending.shape[1:]
            shapes[f"layers.{layer}.pending"] = (num_tokens % chunk, hidden)
        return shapes

    @torch.inference_mode()
    def write(self, slot: int, num_tokens: int, tensors: dict[str, torch.Tensor]) -> None:
        """Fill a slot from ``read``'s output (moved from another instance or the KV store);
        the caller has checked it against ``expected_shapes`` (``handoff.check_memory_state``)."""
        for layer, states in self.layers.items():
            for j, (w, m) in enumerate(zip(states.weights, states.momentum, strict=True)):
                w[slot].copy_(tensors[f"layers.{layer}.weights.{j}"])
                m[slot].copy_(tensors[f"layers.{layer}.momentum.{j}"])
            pending = tensors[f"layers.{layer}.pending"].to(states.pending.dtype)
            states.pending[slot].zero_()
            states.pending[slot, : pending.shape[0]].copy_(pending)


@dataclass
class SpanMemory:
    """A prefill span: tokens ``start:end`` of the step, the sequence's slot and position."""

    start: int
    end: int
    slot: int
    num_computed: int  # the sequence's tokens before the span


class MemoryStateInputs:
    """One step's view of the pool: which tokens belong to which slot (``MemoryStep``)."""

    def __init__(
        self,
        pool: MemoryStatePool,
        decode_slots: list[int],
        decode_positions: list[int],
        spans: list[SpanMemory],
    ) -> None:
        device = pool.device
        self.pool = pool
        self.num_decodes = len(decode_slots)
        self.decode_slots = torch.tensor(decode_slots, dtype=torch.long, device=device)
        # Built once per step, shared by every memory layer (they share the chunk size): where
        # each decode's input goes in its chunk, and the slots whose chunk it completes.
        offsets = [p % pool.chunk_size for p in decode_positions]
        self.decode_offsets = torch.tensor(offsets, dtype=torch.long, device=device)
        completing = [
            s for s, off in zip(decode_slots, offsets, strict=True) if off == pool.chunk_size - 1
        ]
        self.completing_slots = torch.tensor(completing, dtype=torch.long, device=device)
        self.spans = spans

    def run(self, layer_index: int, memory: NeuralMemory, x: torch.Tensor) -> torch.Tensor:
        """Retrieve for every token of the step and store what completes a chunk: [T, E]."""
        states = self.pool.layers[layer_index]
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if self.num_decodes:
            out[: self.num_decodes] = self._decodes(states, memory, x[: self.num_decodes])
        for span in self.spans:
            out[span.start : span.end] = self._span(states, memory, span, x[span.start : span.end])
        return out

    def _decodes(self, states: LayerStates, memory: NeuralMemory, x: torch.Tensor) -> torch.Tensor:
        slots = self.decode_slots
        states.pending.index_put_((slots, self.decode_offsets), x)
        # Reading needs only the weights; momentum is gathered for the completing chunks alone.
        weights = tuple(w.index_select(0, slots) for w in states.weights)
        retrieved = memory.retrieve(weights, memory.project(x[:, None, :]).q)[:, 0]
        done = self.completing_slots
        if done.numel():
            inputs = memory.project(states.pending.index_select(0, done))
            states.scatter(done, memory.store(states.gather(done), inputs))
        return retrieved.float()

    def _span(
        self, states: LayerStates, memory: NeuralMemory, span: SpanMemory, x: torch.Tensor
    ) -> torch.Tensor:
        chunk = memory.config.chunk_size
        live = span.num_computed % chunk
        slot = torch.tensor([span.slot], device=x.device)
        inputs = torch.cat([states.pending[span.slot, :live], x])  # from the chunk boundary
        retrieved, after = memory(inputs[None], states.gather(slot))
        states.scatter(slot, after)
        rest = inputs.shape[0] % chunk
        states.pending[span.slot, :rest] = inputs[inputs.shape[0] - rest :]
        return retrieved[0, live:].float()
