"""Building blocks of the heads: projection, classifier pieces, and the mechanisms the methods share."""
from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    """``P_m(x) = ReLU(W_m x + b_m)``: maps a cached feature to the head's hidden width."""

    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class Alignment(nn.Module):
    """In-batch cross-modal alignment (EDM paper, eqs. 12–14 and the learnable gate of eq. 22).

    ``S[i, j] = cos(h_cur[i], h_prev[j])``: row i is the current modality's sample i, so that
    ``a = S' H_prev`` gathers, for each sample, the previous chain state of the samples whose previous
    representation resembles it. Threshold mode keeps ``S' = S ⊙ 1[S > τ]``; gate mode uses
    ``S' = σ(g(S)) ⊙ S`` with g a small elementwise MLP. In both the diagonal is set to 1 (a sample
    always sees its own state) and rows are normalised to sum 1 in absolute value (choice).
    """

    def __init__(self, tau: float = 0.5, gate: str = "threshold", gate_hidden: int = 8):
        super().__init__()
        self.tau = tau
        # τ as a tensor too (not saved: it is an option): stacked runs of several τ read their own.
        self.register_buffer("threshold", torch.tensor(float(tau)), persistent=False)
        self.gate = nn.Sequential(nn.Linear(1, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 1)) if gate == "learnable" else None

    def weights(self, h_cur: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """The row-normalised ``S'`` ([B, B]); exposed for tests and analysis."""
        s = nn.functional.normalize(h_cur, dim=1, eps=1e-8) @ nn.functional.normalize(h_prev, dim=1, eps=1e-8).T
        if self.gate is None:
            s = torch.where(s > self.threshold, s, 0.0)
        else:
            s = torch.sigmoid(self.gate(s.unsqueeze(-1)).squeeze(-1)) * s
        s.diagonal().fill_(1.0)  # in place on a fresh tensor; the diagonal gets no gradient, as it should
        return s / s.abs().sum(1, keepdim=True)

    def forward(self, h_cur: torch.Tensor, h_prev: torch.Tensor, state_prev: torch.Tensor) -> torch.Tensor:
        return self.weights(h_cur, h_prev) @ state_prev


class MemoryCell(nn.Module):
    """The LSTM-style modality-aware memory unit (EDM paper, eqs. 15–19).

    ``u = W_u [h ; a] + b_u`` fuses a modality's features (width d) with what alignment brought from
    the chain (width of the memory); forget, input and output gates and the candidate read
    ``[u ; H_prev]``; ``C = f ⊙ C_prev + i ⊙ C̃``, ``H = o ⊙ tanh(C)``.

    Three ways of computing the same function keep the cell cheap (it is most of the method's
    arithmetic): the gate product is split into ``W_gu u + W_gH H_prev``, so that autograd skips the
    input gradient of the detached ``H_prev``; ``a = None`` stands for ``a = 0`` (the first chain step)
    and skips that block of ``W_u``, whose gradient is then exactly zero as it would be; and a state
    of one row ``[1, m]`` (the inherited state every sample starts from) is multiplied once and
    broadcast instead of once per sample.
    """

    def __init__(self, hidden: int, memory: int):
        super().__init__()
        self.fuse = nn.Linear(hidden + memory, memory)
        self.gates_u = nn.Linear(memory, 4 * memory)
        self.gates_h = nn.Linear(memory, 4 * memory, bias=False)

    def forward(self, h, a, h_state, c_state):
        if a is None:
            u = nn.functional.linear(h, self.fuse.weight[:, :h.shape[1]], self.fuse.bias)
        else:
            u = self.fuse(torch.cat([h, a], 1))
        gates = self.gates_u(u) + self.gates_h(h_state)
        m = c_state.shape[1]
        f, i, o = torch.sigmoid(gates[:, :3 * m]).chunk(3, dim=1)  # one sigmoid for the three gates
        c = f * c_state + i * torch.tanh(gates[:, 3 * m:])
        return o * torch.tanh(c), c


class LoRA(nn.Module):
    """Low-rank residual ``LoRA(z) = s · B A z`` (Hu et al. 2022), added to a frozen layer's output.

    ``A`` (``down``, r × d_in) keeps nn.Linear's default (Kaiming-uniform) initialisation, ``B``
    (``up``, d_out × r) starts at zero, so the adapter is exactly a no-op until it is trained.
    ``scaling="none"`` gives s = 1, CCAT's eq. 9 (``LoRA_m(z) = B_m A_m z``, α = 1); ``"alpha-over-rank"``
    gives s = α / r, the LoRA paper's convention, under which a higher rank starts with a smaller
    effective step (so a rank grid would also be a learning-rate grid).
    """

    def __init__(self, dim_in: int, dim_out: int, rank: int = 2, alpha: float = 1.0, scaling: str = "none"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if scaling not in ("none", "alpha-over-rank"):
            raise ValueError(f"LoRA scaling must be none or alpha-over-rank, got {scaling!r}")
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank if scaling == "alpha-over-rank" else alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(z)) * self.scale


class CrossAttentionBlock(nn.Module):
    """One direction of cross-attention (CCAT appendix A.1): the query modality attends to another.

    ``a = MHA(q = z_q, k = v = z_kv)``, ``h = LN(z_q + a)``, ``f = LN(h + FFN(h))``, then average-pool
    over the query's tokens: ``[B, T_q, d] × [B, T_kv, d] → [B, d]``. Works for any token counts.
    With a single key token the softmax is exactly 1, so ``a = W_o (W_v z_kv + b_v) + b_o`` is computed
    directly (same output as the full MHA, without the query/key projections that cannot matter).
    """

    def __init__(self, hidden: int, heads: int = 4, ffn_mult: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn_mult * hidden), nn.GELU(), nn.Linear(ffn_mult * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, z_q: torch.Tensor, z_kv: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        """``ignore`` ``[B, T_kv]``: key tokens a sample does not attend to (True), as ``key_padding_mask``."""
        if z_kv.shape[1] == 1:
            d = z_kv.shape[-1]
            value = nn.functional.linear(z_kv, self.attn.in_proj_weight[2 * d:], self.attn.in_proj_bias[2 * d:])
            a = self.attn.out_proj(value)  # [B, 1, d], broadcast over the query tokens
        else:
            a = self.attn(z_q, z_kv, z_kv, key_padding_mask=ignore, need_weights=False)[0]
        h = self.norm1(z_q + a)
        return self.norm2(h + self.ffn(h)).mean(1)


class BiCrossAttention(nn.Module):
    """Bidirectional cross-attention fusion over M ≥ 2 modalities: ``f = Σ_i Block_{i←K_i}(z_i, z_{K_i})``.

    ``form="pairs"``: one block per ordered pair, K_i = {j} (for M = 2 exactly the paper's two
    directions; for M > 2 the sum over all M(M−1) ordered pairs, choice). ``form="joint"``: one block per
    modality, whose queries attend to the tokens of all the others at once (K_i = every j ≠ i, absent
    ones masked out of the keys): M blocks instead of M(M−1), the same two directions at M = 2 (and the
    same parameters, drawn in the same order). A direction contributes to a sample only when its query
    modality and at least one key modality are present there; ``forward`` also returns how many
    directions contributed per sample.
    """

    def __init__(self, modalities: list[str], hidden: int, heads: int = 4, ffn_mult: int = 4, form: str = "pairs"):
        super().__init__()
        if form not in ("pairs", "joint"):
            raise ValueError(f"cross-attention form must be pairs or joint, got {form!r}")
        if form == "pairs":
            self.directions = [(i, (j,)) for i in modalities for j in modalities if i != j]
        else:
            self.directions = [(i, tuple(j for j in modalities if j != i)) for i in modalities]
        self.blocks = nn.ModuleDict({self.name(i, keys): CrossAttentionBlock(hidden, heads, ffn_mult)
                                     for i, keys in self.directions})

    @staticmethod
    def name(query: str, keys: tuple[str, ...]) -> str:
        return f"{query}<-{'+'.join(keys)}"

    def forward(self, z: dict[str, torch.Tensor], present: dict[str, torch.Tensor]):
        """``z[m]``: ``[B, T_m, d]`` token features → (``f`` ``[B, d]``, contributing directions ``[B]``)."""
        fused, count = 0.0, 0.0
        for i, keys in self.directions:
            block = self.blocks[self.name(i, keys)]
            if len(keys) == 1:
                out, some = block(z[i], z[keys[0]]), present[keys[0]]
            else:
                ignore = torch.cat([(~present[j]).unsqueeze(1).expand(-1, z[j].shape[1]) for j in keys], 1)
                some = ~ignore.all(1)
                # A sample with no key modality attends to the zeros (no all-masked softmax, no NaN): its
                # direction does not count below.
                out = block(z[i], torch.cat([z[j] for j in keys], 1), ignore & some.unsqueeze(1))
            both = (present[i] & some).unsqueeze(1).to(z[i].dtype)
            fused = fused + out * both
            count = count + both.squeeze(1)
        return fused, count
