"""Titans' neural long-term memory (Behrouz et al. 2025, "Titans: Learning to Memorize at Test
Time", arXiv 2501.00663, section 3), in plain torch.

The memory is a per-head MLP ``M`` whose weights are a sequence's recurrent state, written at
test time by gradient descent with momentum and forgetting on the associative loss:

    k = l2norm(silu(x W_K)),  v = silu(x W_V),  q = l2norm(silu(x W_Q))      (per head)
    theta = max_lr * sigmoid(x W_theta + b),  eta = sigmoid(x W_eta + b),  alpha = sigmoid(...)
    loss_t = mean_d (M(k_t) - v_t)^2             (mean over head_dim, as titans-pytorch)
    S_t = eta_t S_{t-1} - theta_t grad loss_t(M_{t'}),   M_t = (1 - alpha_t) M_{t-1} + S_t
    y_t = W_O merge_heads(M(q_t))

with ``t'`` the start of t's chunk (section 3.2): every gradient of a chunk is taken at the
weights the chunk starts from, so a chunk's C updates reduce to a few matmuls, and momentum and
forgetting over its tokens combine in closed form (products of gates over C x C token pairs).
Chunks run one after another. Tokens of chunk i read the memory after chunks < i (the paper's
M_{t-1} at segment granularity), so a chunk never reads itself. (titans-pytorch reads per-token
intermediate weights instead, shifted so token t sees its own update: see the tests.)

Gradients of M are written out by hand (backprop through L matmuls and GELU), not with autograd:
the serving engine runs under ``torch.inference_mode()``, and training differentiates through
the update with ordinary autograd, second order included, since it is all tensor expressions.

Memory math is float32 whatever the model's dtype; the projections run in the model's dtype.

Legend: B sequences, n tokens, H heads, D head_dim, E hidden_size, C chunk_size, L depth,
(d_in, d_out) the shape of one memory layer per head (D -> expansion * D -> ... -> D).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raycake.model.config import NeuralMemoryConfig

__all__ = ["MemoryInputs", "MemoryState", "NeuralMemory", "NeuralMemoryConfig", "mlp_grads"]

# Gate bias init: forgetting is per token, so an untrained memory forgets little
# (sigmoid(-6) ~ 0.0025 a token, a horizon of some hundreds of tokens); lr and momentum start at 1/2.
_DECAY_BIAS_INIT = -6.0


class MemoryState(NamedTuple):
    """One batch of sequences' memory at a chunk boundary (float32)."""

    weights: tuple[torch.Tensor, ...]  # L x [B, H, d_in, d_out]
    momentum: tuple[torch.Tensor, ...]  # L x [B, H, d_in, d_out]: the surprise S


class MemoryInputs(NamedTuple):
    """Per-token projections of n tokens of B sequences (float32)."""

    q: torch.Tensor  # [B, n, H, D] silu, l2-normalised
    k: torch.Tensor  # [B, n, H, D] silu, l2-normalised
    v: torch.Tensor  # [B, n, H, D] silu
    lr: torch.Tensor  # [B, n, H] theta
    momentum: torch.Tensor  # [B, n, H] eta
    decay: torch.Tensor  # [B, n, H] alpha


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) GELU: Phi(z) + z phi(z)."""
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _mlp(
    weights: tuple[torch.Tensor, ...], z: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """M(z) for z [B, n, H, D]: the output, each layer's input, each GELU's pre-activation."""
    inputs, pre = [], []
    for i, w in enumerate(weights):
        if i > 0:
            pre.append(z)
            z = F.gelu(z)
        inputs.append(z)
        z = torch.einsum("bnhi,bhio->bnho", z, w)
    return z, inputs, pre


def mlp_grads(
    weights: tuple[torch.Tensor, ...],
    k: torch.Tensor,
    v: torch.Tensor,
    token_weights: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """sum_t c_t * d loss_t / d W_l for K weightings c at once, by hand-written backprop.

    weights: L x [B, H, d_in, d_out]; k, v: [B, n, H, D]; token_weights c: [B, n, H, K].
    Returns L tensors [K, B, H, d_in, d_out]. loss_t = mean_d (M(k_t) - v_t)^2, per head.
    """
    pred, inputs, pre = _mlp(weights, k)
    delta = (pred - v) * (2.0 / v.shape[-1])  # d loss_t / d pred_t, [B, n, H, D]
    grads: list[torch.Tensor] = []
    for i in range(len(weights) - 1, -1, -1):
        # A token's gradient is the outer product input^T delta; weighting before the
        # contraction sums them over tokens without materialising one per token.
        scaled = inputs[i].unsqueeze(-2) * token_weights.unsqueeze(-1)  # [B, n, H, K, d_in]
        grads.append(torch.einsum("bnhki,bnho->kbhio", scaled, delta))
        if i > 0:
            delta = torch.einsum("bnho,bhio->bnhi", delta, weights[i]) * _gelu_grad(pre[i - 1])
    return tuple(reversed(grads))


def _transfer(gate: torch.Tensor) -> torch.Tensor:
    """T[..., t, j] = prod_{j < i <= t} gate_i for t >= j, else 0: gate [..., C] -> [..., C, C].

    A masked cumprod, not exp of differences of log-cumsums: exact, no 0/0 when a gate is 0,
    and its autograd is well defined there too.
    """
    c = gate.shape[-1]
    idx = torch.arange(c, device=gate.device)
    rows, cols = idx[:, None], idx[None, :]
    rep = gate.unsqueeze(-1).expand(*gate.shape, c)  # [..., i, j] = gate_i
    prods = torch.where(rows > cols, rep, torch.ones_like(rep)).cumprod(dim=-2)
    return torch.where(rows >= cols, prods, torch.zeros_like(prods))


class NeuralMemory(nn.Module):
    """Titans' neural memory: ``forward`` reads and writes whole sequences; ``project``,
    ``retrieve`` and ``store`` are the pieces a serving engine drives token by token."""

    def __init__(self, config: NeuralMemoryConfig) -> None:
        super().__init__()
        self.config = config
        e, h, d = config.hidden_size, config.num_heads, config.head_dim
        self.to_qkv = nn.Linear(e, 3 * h * d, bias=False)  # [W_Q | W_K | W_V]
        # [W_theta | W_eta | W_alpha], with biases: they set the gates' starting points.
        self.to_gates = nn.Linear(e, 3 * h)
        self.out_proj = nn.Linear(h * d, e, bias=False)  # W_O
        # The learned initial memory M_0, per head.
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.empty(h, d_in, d_out)) for d_in, d_out in config.layer_shapes()
        )
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        """Xavier-uniform M_0 per head (as titans-pytorch's MemoryMLP); gate biases as above."""
        for w in self.init_weights:
            bound = math.sqrt(6.0 / (w.shape[-2] + w.shape[-1]))
            w.uniform_(-bound, bound)
        h = self.config.num_heads
        self.to_gates.bias.zero_()
        self.to_gates.bias[2 * h :] = _DECAY_BIAS_INIT

    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> MemoryState:
        """M_0 for each of ``batch_size`` sequences, zero momentum; float32 on ``device``."""
        device = self.init_weights[0].device if device is None else device
        # A copy per sequence (not an expanded view), so a caller may write states in place.
        weights = tuple(
            w.to(device=device, dtype=torch.float32).expand(batch_size, *w.shape).contiguous()
            for w in self.init_weights
        )
        momentum = tuple(torch.zeros_like(w) for w in weights)
        return MemoryState(weights, momentum)

    def project(self, x: torch.Tensor) -> MemoryInputs:
        """x [B, n, E] (any float dtype) -> the float32 (float64 for float64 x) projections."""
        b, n, _ = x.shape
        h, d = self.config.num_heads, self.config.head_dim
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays (for gradcheck)
        q, k, v = self.to_qkv(x).to(dtype).view(b, n, 3, h, d).unbind(dim=2)
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
        lr, momentum, decay = self.to_gates(x).to(dtype).view(b, n, 3, h).unbind(dim=2)
        return MemoryInputs(
            q=F.normalize(q, dim=-1),
            k=F.normalize(k, dim=-1),
            v=v,
            lr=self.config.max_lr * torch.sigmoid(lr),
            momentum=torch.sigmoid(momentum),
            decay=torch.sigmoid(decay),
        )

    def _read(self, weights: tuple[torch.Tensor, ...], q: torch.Tensor) -> torch.Tensor:
        """M(q) with heads merged, no output projection: [B, n, H * D] float32."""
        return _mlp(weights, q)[0].flatten(2)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        # W_O is a model projection: it runs in the model's dtype, like the input projections.
        out = self.out_proj(y.to(self.out_proj.weight.dtype))
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def retrieve(self, weights: tuple[torch.Tensor, ...], q: torch.Tensor) -> torch.Tensor:
        """y = W_O M(q) without updating M: weights L x [B, H, ...], q [B, n, H, D] -> [B, n, E]
        float32 (the caller casts)."""
        return self._out(self._read(weights, q))

    def _store_chunk(self, state: MemoryState, inputs: MemoryInputs) -> MemoryState:
        """One chunk's C updates, every gradient at ``state.weights``, in closed form.

        Unrolling S_t = eta_t S_{t-1} + u_t and M_t = keep_t M_{t-1} + S_t over the chunk
        (keep = 1 - alpha, u_t = -theta_t grad_t) gives, with P = _transfer(eta),
        A_t = prod_{t < i <= C} keep_i and eta_{1..t} = prod_{i <= t} eta_i:
            S_C = eta_{1..C} S_0 + sum_j P[C, j] u_j
            M_C = keep_{1..C} M_0 + (sum_t A_t eta_{1..t}) S_0 + sum_j (sum_t A_t P[t, j]) u_j
        so the u_j enter only through two token weightings of the same gradients.
        """
        lr, eta, keep = (t.transpose(1, 2) for t in (inputs.lr, inputs.momentum, 1 - inputs.decay))
        p_eta = _transfer(eta)  # [B, H, C, C]
        after = _transfer(keep)[..., -1, :]  # A_t, [B, H, C]
        eta_prefix = eta.cumprod(dim=-1)  # [B, H, C]
        coef_m = torch.einsum("bht,bhtj->bhj", after, p_eta)
        coef_s = p_eta[..., -1, :]
        token_weights = torch.stack((coef_m, coef_s), dim=-1) * lr.unsqueeze(-1)  # [B, H, C, 2]
        grads = mlp_grads(state.weights, inputs.k, inputs.v, token_weights.transpose(1, 2))
        m_from_m0 = keep.prod(dim=-1)[..., None, None]  # [B, H, 1, 1]
        m_from_s0 = (after * eta_prefix).sum(dim=-1)[..., None, None]
        s_from_s0 = eta_prefix[..., -1, None, None]
        weights = tuple(
            m_from_m0 * w + m_from_s0 * s - g[0]
            for w, s, g in zip(state.weights, state.momentum, grads, strict=True)
        )
        momentum = tuple(s_from_s0 * s - g[1] for s, g in zip(state.momentum, grads, strict=True))
        return MemoryState(weights, momentum)

    def store(self, state: MemoryState, inputs: MemoryInputs) -> MemoryState:
        """Apply the m chunk updates of inputs covering m >= 1 whole chunks, in order."""
        n, c = inputs.k.shape[1], self.config.chunk_size
        if n == 0 or n % c:
            raise ValueError(
                f"store: expected a positive multiple of chunk_size={c} tokens, got {n}"
            )
        for s in range(0, n, c):
            state = self._store_chunk(state, MemoryInputs(*(t[:, s : s + c] for t in inputs)))
        return state

    def forward(
        self, x: torch.Tensor, state: MemoryState | None = None
    ) -> tuple[torch.Tensor, MemoryState]:
        """Read and write x [B, S, E], which starts at the chunk boundary ``state`` (None: the
        initial state) is at. Returns the outputs [B, S, E] in x's dtype (chunk i reads the
        memory after chunks < i) and the state after x's whole chunks: a trailing partial chunk
        is read but not stored; the caller feeds its tokens again with the next ones."""
        b, s_len, _ = x.shape
        c = self.config.chunk_size
        if state is None:
            state = self.initial_state(b, device=x.device)
        inputs = self.project(x)
        reads = []
        for s in range(0, s_len, c):
            chunk = MemoryInputs(*(t[:, s : s + c] for t in inputs))
            reads.append(self._read(state.weights, chunk.q))
            if s + c <= s_len:
                state = self._store_chunk(state, chunk)
        if not reads:
            return x.new_zeros(b, 0, self.config.hidden_size), state
        # One output projection over the whole sequence rather than one per chunk.
        return self._out(torch.cat(reads, dim=1)).to(x.dtype), state
