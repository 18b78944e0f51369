"""Llama-family decoder over packed rows: GQA, RoPE / llama3 scaling / 3-D M-RoPE, SwiGLU / GeGLU,
RMSNorm (incl. Gemma's x * (1 + w)), optional QK-norm, Gemma embedding scaling, tied or untied output."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_loneforge.datamodules.batch import IGNORE_INDEX
from lightning_loneforge.model_zoo.attention import attention
from lightning_loneforge.model_zoo.config import TextConfig
from lightning_loneforge.model_zoo.loss import chunked_argmax, chunked_cross_entropy
from lightning_loneforge.model_zoo.rope import apply_rotary, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; `offset=1.0` gives Gemma's `x * (1 + w)` with `w` initialised to 0."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "rms_gemma":
        return RMSNorm(dim, eps, offset=1.0)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r} (rms, rms_gemma, layernorm)")


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU (silu) or GeGLU (tanh GELU)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


@dataclass
class PrefixLM:
    """Prefix-LM attention (PaliGemma): each sample's first `length` tokens attend to each other both ways.

    Causal attention gives the suffix rows; the prefix rows are recomputed by non-causal attention over the
    prefix tokens only (`index` into the row, `cu_seqlens` of the prefixes), so every backend can run it.
    """

    index: Tensor
    cu_seqlens: Tensor
    max_seqlen: int

    @classmethod
    def from_targets(cls, targets: Tensor, cu_seqlens: Tensor) -> PrefixLM:
        """Prefix of each sample = tokens before its first labelled token (image + prompt); all of it if none."""
        bounds = cu_seqlens.tolist()
        labelled = (targets != IGNORE_INDEX).tolist()
        index, lengths = [], []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            # targets are shifted: target[i] labels token i + 1, so the first labelled token is first_target + 1
            first = next((i + 1 for i in range(start, end) if labelled[i]), end)
            index.extend(range(start, first))
            lengths.append(first - start)
        device = targets.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return cls(torch.tensor(index, dtype=torch.long, device=device), cu, max(lengths, default=0))


class DecoderAttention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        dim, hd = config.hidden_size, config.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(dim, config.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * hd, dim, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int, prefix: PrefixLM | None = None
    ) -> Tensor:
        total = x.shape[0]
        q = self.q_proj(x).view(total, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(total, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(total, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        if prefix is not None:
            i = prefix.index
            prefix_out = attention(q[i], k[i], v[i], prefix.cu_seqlens, prefix.max_seqlen, causal=False)
            out = out.index_copy(0, i, prefix_out)
        return self.o_proj(out.reshape(total, -1))


class DecoderBlock(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        act = "silu" if config.mlp == "swiglu" else "gelu_tanh"
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, act)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int, prefix: PrefixLM | None = None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, prefix)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LMOutput:
    """What `Decoder.forward` gives: final hidden states, and when asked the loss and greedy predictions."""

    hidden: Tensor
    """`[T, hidden]` after the final norm."""
    loss: Tensor | None = None
    """Mean cross-entropy over labelled targets (chunked, no full logits)."""
    num_targets: int = 0
    predictions: Tensor | None = None
    """`[num_targets]` argmax token at each labelled position, in order."""
    action_loss: Tensor | None = None
    """Flow-matching loss of the action head (VLA rows with actions in the batch)."""


class TokenEmbedding(nn.Embedding):
    """`nn.Embedding` initialised N(0, 0.02) (also when a strategy materialises it from meta)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class Decoder(nn.Module):
    """Token embedding, `blocks`, final norm and output projection (`lm_head`, absent when tied).

    Everything that touches the embedding / output matrices runs inside `forward` (so a sharding wrapper
    around this tower gathers them once): embedding lookup and scaling, scattering vision features into their
    placeholder positions, the blocks, the final norm, and the chunked loss / predictions when targets are given.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.norm = make_norm(config.norm, config.hidden_size, config.norm_eps)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(config.resolved_head_dim, config.rope_theta, config.rope_scaling)
        """Plain tensor, not a buffer: survives meta-device construction and is moved per call."""

    @property
    def output_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: Tensor, vision_embeds: Tensor | None = None, vision_mask: Tensor | None = None):
        """Token embeddings (scaled for Gemma), with `vision_embeds` placed where `vision_mask` is True."""
        embeds = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            embeds = embeds * torch.tensor(math.sqrt(self.config.hidden_size), dtype=embeds.dtype)
        if vision_embeds is not None:
            embeds = embeds.masked_scatter(vision_mask[:, None], vision_embeds.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        cu_seqlens: Tensor,
        max_seqlen: int,
        *,
        vision_embeds: Tensor | None = None,
        vision_mask: Tensor | None = None,
        targets: Tensor | None = None,
        predict: bool = False,
        loss_chunk_size: int = 4096,
    ) -> LMOutput:
        """Run the packed row; with `targets` (`[T]`, next-token ids or IGNORE_INDEX) also the loss."""
        x = self.embed(input_ids, vision_embeds, vision_mask)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.config.mrope_section)
        prefix = None
        if self.config.prefix_lm:
            if targets is None:
                raise ValueError("a prefix-LM decoder (PaliGemma) needs targets to know where each prefix ends")
            prefix = PrefixLM.from_targets(targets, cu_seqlens)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens, max_seqlen, prefix)
        out = LMOutput(hidden=self.norm(x))
        if targets is not None:
            out.loss, out.num_targets = chunked_cross_entropy(
                out.hidden, self.output_weight, targets, chunk_size=loss_chunk_size
            )
            if predict:
                keep = targets != IGNORE_INDEX
                out.predictions = chunked_argmax(out.hidden[keep], self.output_weight, chunk_size=loss_chunk_size)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits (tests and generation only; training uses the chunked loss)."""
        return hidden @ self.output_weight.t()
