"""pi0-style flow-matching action expert: a small Gemma-like transformer over [state, action tokens] that
attends jointly to the VLM prefix and predicts the flow velocity of a noisy action chunk.

Convention (pi0, Black et al. 2024, arXiv:2410.24164, Sec. IV-B, Eq. 1 and after; the same as openpi and
transformers' ``PI0ForConditionalGeneration``, so its weights load unchanged):

    L(θ) = E_{t, ε} || v_θ(x_t, o) − u ||²,   x_t = t·ε + (1 − t)·A,   u = ε − A,   ε ~ N(0, I),

i.e. the brief's ``x_t = t·x1 + (1 − t)·x0`` with target ``x1 − x0`` where x1 = noise and x0 = actions.
t ~ 0.999·Beta(1.5, 1) + 0.001 (more weight on noisy times). ``sample`` integrates from t = 1 (noise) to t = 0
(actions) with N Euler steps ``x ← x − v/N``. (The paper writes τ = 1 − t: A^τ = τA + (1 − τ)ε, integrated
from τ = 0 to 1.)

The prefix is either the VLM's per-layer keys/values (pi0: layer i of the expert attends to layer i of the
VLM; keys already rotated) or, for VLMs that only give hidden states, the last hidden states, which each
expert layer projects with its own k/v weights. The state token sees the prefix and itself; action tokens
see everything (pi0's block mask).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_loneforge.model_zoo.towers.vit import (
    activation,
    map_strict,
    meta_shapes,
    name_rules,
    rename_key,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ActionExpertConfig:
    """Shape of the action expert; defaults are pi0's (Gemma-300M expert beside PaliGemma-3B)."""

    action_dim: int = 32
    """Action vector width (pi0 pads every robot's actions to 32)."""
    state_dim: int = 32
    """Proprioceptive state width (padded to 32 in pi0)."""
    horizon: int = 50
    """Actions per chunk (pi0's ``chunk_size``)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 18
    """With per-layer prefix K/V this must equal the VLM's layer count."""
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    """With per-layer prefix K/V, ``num_kv_heads`` and ``head_dim`` must match the VLM's."""
    hidden_act: str = "gelu_pytorch_tanh"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    prefix_dim: int | None = None
    """Width of prefix hidden states when the expert gets hidden states instead of K/V (adds ``prefix_proj``);
    None: the prefix comes as per-layer K/V (pi0)."""
    min_period: float = 4e-3
    max_period: float = 4.0
    """Periods of the sinusoidal time embedding."""
    time_beta: tuple[float, float] = (1.5, 1.0)
    time_scale: float = 0.999
    time_offset: float = 0.001
    """Training times t = time_scale * Beta(*time_beta) + time_offset."""
    num_steps: int = 10
    """Euler steps of ``sample``."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ActionExpertConfig: num_heads={self.num_heads} not a multiple of {self.num_kv_heads}")
        if self.hidden_size % 2 or self.head_dim % 2:
            raise ValueError("ActionExpertConfig: hidden_size and head_dim must be even")
        activation(self.hidden_act)


@dataclass
class ActionPrefix:
    """What the action tokens attend to: per-layer keys/values ``[B, kv_heads, P, head_dim]`` (rotated),
    ``mask [B, P]`` (True = real token) and ``lengths [B]`` (real tokens; the suffix's positions start there)."""

    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor
    lengths: Tensor


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + w)`` in float32, ``w`` initialised to 0 (Gemma)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half layout) of ``x [B, H, S, D]`` at integer ``positions [B, S]``."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    return x * cos + half * sin


class ExpertAttention(nn.Module):
    def __init__(self, config: ActionExpertConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.q = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], -1, self.config.head_dim).transpose(1, 2)

    def key_value(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated keys and values ``[B, kv_heads, S, head_dim]`` of tokens ``x [B, S, hidden]``."""
        return rotate(self._heads(self.k(x)), positions, self.config.rope_theta), self._heads(self.v(x))

    def forward(self, x: Tensor, positions: Tensor, prefix_kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        q = rotate(self._heads(self.q(x)), positions, self.config.rope_theta)
        k, v = self.key_value(x, positions)
        k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o(out.transpose(1, 2).flatten(2))


class ExpertMLP(nn.Module):
    def __init__(self, config: ActionExpertConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class ExpertBlock(nn.Module):
    def __init__(self, config: ActionExpertConfig) -> None:
        super().__init__()
        self.input_norm = GemmaRMSNorm(config.hidden_size, config.norm_eps)
        self.attn = ExpertAttention(config)
        self.post_attn_norm = GemmaRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = ExpertMLP(config)

    def forward(self, x: Tensor, positions: Tensor, prefix_kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        x = x + self.attn(self.input_norm(x), positions, prefix_kv, mask)
        return x + self.mlp(self.post_attn_norm(x))


class FlowMatchingActionExpert(nn.Module):
    """pi0's action expert. ``loss(actions, state, prefix)`` trains it; ``sample(state, prefix)`` acts.

    Shapes: actions / noise ``[B, horizon, action_dim]``, state ``[B, state_dim]``, timestep ``[B]``.
    """

    def __init__(self, config: ActionExpertConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.state_proj = nn.Linear(c.state_dim, c.hidden_size)
        self.action_in_proj = nn.Linear(c.action_dim, c.hidden_size)
        self.action_time_mlp_in = nn.Linear(2 * c.hidden_size, c.hidden_size)
        self.action_time_mlp_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.prefix_proj = nn.Linear(c.prefix_dim, c.hidden_size) if c.prefix_dim else None
        self.blocks = nn.ModuleList(ExpertBlock(c) for _ in range(c.num_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        self.action_out_proj = nn.Linear(c.hidden_size, c.action_dim)

    def time_embedding(self, timestep: Tensor) -> Tensor:
        """Sinusoidal embedding ``[B, hidden]`` (float32) with periods from min_period to max_period."""
        c = self.config
        fraction = torch.linspace(0.0, 1.0, c.hidden_size // 2, dtype=torch.float32, device=timestep.device)
        freq = 2 * math.pi / (c.min_period * (c.max_period / c.min_period) ** fraction)
        angles = timestep.float()[:, None] * freq
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def encode_prefix(
        self,
        hidden: Tensor | None = None,
        kv: list[tuple[Tensor, Tensor]] | None = None,
        mask: Tensor | None = None,
    ) -> ActionPrefix:
        """Prefix from the VLM: ``kv`` (one rotated ``(k, v)`` pair per expert layer, ``[B, kv_heads, P, head_dim]``)
        or ``hidden [B, P, prefix_dim]``; ``mask [B, P]`` marks real tokens (default: all). Compute once per
        observation; ``sample`` reuses it for every Euler step."""
        c = self.config
        if (hidden is None) == (kv is None):
            raise ValueError("FlowMatchingActionExpert.encode_prefix: pass exactly one of hidden= or kv=")
        if kv is not None:
            if len(kv) != c.num_layers:
                raise ValueError(f"FlowMatchingActionExpert: got K/V of {len(kv)} layers, expert has {c.num_layers}")
            want = (c.num_kv_heads, c.head_dim)
            k0 = kv[0][0]
            if k0.ndim != 4 or (k0.shape[1], k0.shape[3]) != want:
                raise ValueError(f"FlowMatchingActionExpert: prefix K/V {tuple(k0.shape)} must be [B, {want[0]}, P, {want[1]}]")
            batch, length = k0.shape[0], k0.shape[2]
        else:
            if self.prefix_proj is None or hidden.ndim != 3 or hidden.shape[-1] != c.prefix_dim:
                raise ValueError(
                    f"FlowMatchingActionExpert: hidden prefix {tuple(hidden.shape)} needs config.prefix_dim "
                    f"(= {c.prefix_dim}) as its last dim"
                )
            batch, length = hidden.shape[:2]
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=(hidden if kv is None else k0).device)
        mask = mask.bool()
        if hidden is not None:
            tokens = self.prefix_proj(hidden)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            kv = [block.attn.key_value(block.input_norm(tokens), positions) for block in self.blocks]
        return ActionPrefix(kv=list(kv), mask=mask, lengths=mask.sum(1))

    def _suffix_mask(self, prefix: ActionPrefix, suffix_len: int) -> Tensor:
        """``[B, 1, 1 + horizon, P + 1 + horizon]``: state sees prefix + itself, actions see everything real."""
        batch = prefix.mask.shape[0]
        suffix = torch.ones(suffix_len, suffix_len, dtype=torch.bool, device=prefix.mask.device)
        suffix[0, 1:] = False
        prefix_part = prefix.mask[:, None, None, :].expand(batch, 1, suffix_len, -1)
        return torch.cat([prefix_part, suffix.expand(batch, 1, -1, -1)], dim=-1)

    def forward(self, noisy_actions: Tensor, state: Tensor, timestep: Tensor, prefix: ActionPrefix) -> Tensor:
        """Predicted velocity ``[B, horizon, action_dim]`` at ``x_t = noisy_actions``, time ``timestep``."""
        c = self.config
        if noisy_actions.shape[1:] != (c.horizon, c.action_dim) or state.shape[1:] != (c.state_dim,):
            raise ValueError(
                f"FlowMatchingActionExpert: actions {tuple(noisy_actions.shape)} / state {tuple(state.shape)} must be "
                f"[B, {c.horizon}, {c.action_dim}] / [B, {c.state_dim}]"
            )
        actions = self.action_in_proj(noisy_actions)
        times = self.time_embedding(timestep)[:, None].expand_as(actions).to(actions.dtype)
        actions = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([actions, times], dim=-1))))
        x = torch.cat([self.state_proj(state)[:, None], actions], dim=1)
        positions = prefix.lengths[:, None] + torch.arange(x.shape[1], device=x.device)
        mask = self._suffix_mask(prefix, x.shape[1])
        for block, kv in zip(self.blocks, prefix.kv, strict=True):
            x = block(x, positions, kv, mask)
        return self.action_out_proj(self.norm(x)[:, 1:])

    def sample_time(self, batch: int, device: torch.device | str) -> Tensor:
        c = self.config
        beta = torch.distributions.Beta(torch.tensor(c.time_beta[0]), torch.tensor(c.time_beta[1]))
        return (beta.sample((batch,)) * c.time_scale + c.time_offset).to(device)

    def loss(
        self,
        actions: Tensor,
        state: Tensor,
        prefix: ActionPrefix,
        noise: Tensor | None = None,
        timestep: Tensor | None = None,
    ) -> Tensor:
        """Flow-matching MSE: ``|| v(t·ε + (1−t)·A) − (ε − A) ||²`` averaged over all elements."""
        noise = torch.randn_like(actions) if noise is None else noise
        timestep = self.sample_time(actions.shape[0], actions.device) if timestep is None else timestep
        t = timestep[:, None, None].to(actions.dtype)
        velocity = self(t * noise + (1 - t) * actions, state, timestep, prefix)
        return F.mse_loss(velocity.float(), (noise - actions).float())

    @torch.no_grad()
    def sample(
        self, state: Tensor, prefix: ActionPrefix, num_steps: int | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """Actions ``[B, horizon, action_dim]``: Euler from t = 1 (noise) to t = 0 in ``num_steps`` steps."""
        c = self.config
        num_steps = num_steps or c.num_steps
        x = noise
        if x is None:
            x = torch.randn(state.shape[0], c.horizon, c.action_dim, device=state.device, dtype=state.dtype)
        dt = -1.0 / num_steps
        for step in range(num_steps):
            timestep = torch.full((state.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=state.device)
            x = x + dt * self(x, state, timestep, prefix)
        return x


def pad_packed(packed: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Packed per-token rows ``[T, ...]`` with ``cu_seqlens [B+1]`` -> padded ``[B, max_len, ...]`` and mask."""
    lengths = cu_seqlens.diff()
    batch, longest = lengths.numel(), int(lengths.max())
    mask = torch.arange(longest, device=packed.device)[None] < lengths[:, None].to(packed.device)
    out = packed.new_zeros(batch, longest, *packed.shape[1:])
    out[mask] = packed[: int(cu_seqlens[-1])]
    return out, mask


# ---- transformers weight names -------------------------------------------------------------------

_BLOCK_NAMES = [
    ("layers.{i}.input_layernorm", "blocks.{i}.input_norm"),
    ("layers.{i}.post_attention_layernorm", "blocks.{i}.post_attn_norm"),
    ("layers.{i}.self_attn.q_proj", "blocks.{i}.attn.q"),
    ("layers.{i}.self_attn.k_proj", "blocks.{i}.attn.k"),
    ("layers.{i}.self_attn.v_proj", "blocks.{i}.attn.v"),
    ("layers.{i}.self_attn.o_proj", "blocks.{i}.attn.o"),
    ("layers.{i}.mlp.gate_proj", "blocks.{i}.mlp.gate"),
    ("layers.{i}.mlp.up_proj", "blocks.{i}.mlp.up"),
    ("layers.{i}.mlp.down_proj", "blocks.{i}.mlp.down"),
    ("norm", "norm"),
]
_HEAD_NAMES = ["state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out"]
# Checkpoint files (Hub lerobot/pi0_*, and transformers' save_pretrained) use openpi's names ...
_FILE_NAMES = [("paligemma_with_expert.gemma_expert.model." + hf, ours) for hf, ours in _BLOCK_NAMES] + [
    (name, name) for name in [*_HEAD_NAMES, "action_out_proj"]
]
# ... a loaded PI0ForConditionalGeneration's state_dict() uses these.
_MODULE_NAMES = [("model.dit." + hf, ours) for hf, ours in _BLOCK_NAMES] + [
    *((f"embed_action_time.{name}", name) for name in _HEAD_NAMES),
    ("action_out_proj", "action_out_proj"),
]
_ROOTS = ("model.dit.", "paligemma_with_expert.gemma_expert.", "embed_action_time.", "action_", "state_proj.")
# The expert is fed embeddings, never token ids: its vocabulary matrix is stored but never used.
_UNUSED = ("model.dit.embed_tokens.weight", "paligemma_with_expert.gemma_expert.lm_head.weight")


def hf_to_ours_action(state_dict: Mapping[str, Tensor], prefix: str, config: ActionExpertConfig) -> dict[str, Tensor]:
    """Map a transformers / openpi pi0 checkpoint's action-expert weights to ``FlowMatchingActionExpert`` names.

    ``prefix`` is the checkpoint root ("" or "model."). Only the expert's keys are read (``model.dit.*`` /
    ``paligemma_with_expert.gemma_expert.*``, the state/action/time projections); the VLM's keys are left to the
    other towers. Strict on those keys (KeyError lists unused and missing); the expert's unused vocabulary
    matrix is skipped and logged.
    """
    if config.prefix_dim:
        raise ValueError("hf_to_ours_action: pi0 checkpoints have no prefix_proj; use prefix_dim=None (K/V prefix)")
    own = {}
    for key, value in state_dict.items():
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is None or not rest.startswith(_ROOTS):
            continue
        if rest in _UNUSED:
            log.info("hf_to_ours_action: skipping %s %s (the expert never embeds token ids)", key, tuple(value.shape))
            continue
        own[key] = value
    rules = name_rules(_FILE_NAMES + _MODULE_NAMES, reverse=False)
    return map_strict(own, prefix, rules, meta_shapes(FlowMatchingActionExpert, config), "action expert")


def ours_to_hf_action(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Our weights under checkpoint-file names (what ``save_pretrained`` writes and the Hub holds)."""
    rules = name_rules(_FILE_NAMES, reverse=True)
    out = {}
    for key, value in state_dict.items():
        name = rename_key(key, rules)
        if name is None:
            raise KeyError(f"action expert: no transformers name for our weight {key!r}")
        out[prefix + name] = value
    return out


def action_config_from_hf(config: Mapping) -> ActionExpertConfig:
    """``ActionExpertConfig`` from a transformers pi0 ``config.json`` (as a dict); absent keys take PI0Config's
    defaults (Gemma-300M expert, chunk 50, 32-wide state and actions)."""
    if config.get("model_type") != "pi0":
        raise ValueError(f"action_config_from_hf: model_type={config.get('model_type')!r} is not 'pi0'")
    dit = config.get("dit_config") or {}
    rope = dit.get("rope_parameters") or dit.get("rope_scaling") or {}
    act = dit.get("hidden_activation") or dit.get("hidden_act", "gelu_pytorch_tanh")
    return ActionExpertConfig(
        action_dim=config.get("max_action_dim", 32),
        state_dim=config.get("max_state_dim", 32),
        horizon=config.get("chunk_size", 50),
        hidden_size=dit.get("hidden_size", 1024),
        intermediate_size=dit.get("intermediate_size", 4096),
        num_layers=dit.get("num_hidden_layers", 18),
        num_heads=dit.get("num_attention_heads", 8),
        num_kv_heads=dit.get("num_key_value_heads", 1),
        head_dim=dit.get("head_dim", 256),
        hidden_act="gelu_pytorch_tanh" if act == "gelu" else act,  # Gemma's legacy "gelu" means the tanh one
        norm_eps=dit.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", dit.get("rope_theta", 10000.0)),
        min_period=config.get("min_period", 4e-3),
        max_period=config.get("max_period", 4.0),
        time_beta=(config.get("time_sampling_beta_alpha", 1.5), config.get("time_sampling_beta_beta", 1.0)),
        time_scale=config.get("time_sampling_scale", 0.999),
        time_offset=config.get("time_sampling_offset", 0.001),
        num_steps=config.get("num_inference_steps", 10),
    )
