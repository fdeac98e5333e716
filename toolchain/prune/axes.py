"""Which structure each dimension of each tensor belongs to, and cutting a model down by it.

A llama-family decoder (llama, qwen2, qwen3, gemma3) has four prunable axes:
- `hidden`: the model width, shared by the embeddings, every norm over the residual stream and
  the in/out side of every projection (one choice for the whole model);
- `heads` (query heads), `kv` (key/value heads) and `mlp` (MLP neurons): chosen per block.
Head axes count whole heads (head_dim rows each), so a head is never cut in half, and q/k
norms (one weight of head_dim) are never pruned. A tensor this table does not know is an
error, not silently kept: an unknown variant must not export a model that computes something
else.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

from toolchain.errors import UserError

# block tensor name (after "model.layers.<i>.") -> axis of each dimension (None: not pruned)
_BLOCK = {
    "self_attn.q_proj.weight": ("heads", "hidden"),
    "self_attn.q_proj.bias": ("heads",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "heads"),
    "self_attn.o_proj.bias": ("hidden",),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("mlp", "hidden"),
    "mlp.up_proj.weight": ("mlp", "hidden"),
    "mlp.down_proj.weight": ("hidden", "mlp"),
}
_GLOBAL = {
    "model.embed_tokens.weight": (None, "hidden"),
    "lm_head.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def tensor_axes(name: str, block_norms: tuple[str, ...]) -> tuple[int | None, tuple[str | None, ...]]:
    """(block index or None, axis per dimension) of a state-dict tensor."""
    m = _LAYER.match(name)
    if m is None:
        if name in _GLOBAL:
            return None, _GLOBAL[name]
    else:
        rest = m.group(2)
        if rest in _BLOCK:
            return int(m.group(1)), _BLOCK[rest]
        if rest.removesuffix(".weight") in block_norms:
            return int(m.group(1)), ("hidden",)
    raise UserError(f"no pruning rule for tensor '{name}': this model variant cannot be width-pruned yet")


@dataclass
class Keep:
    """What survives: hidden channels, and per block the query heads, KV heads and MLP neurons
    (sorted indices into the unpruned model's tensors)."""

    hidden: torch.Tensor
    blocks: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def index(self, axis: str, block: int | None) -> torch.Tensor:
        return self.hidden if axis == "hidden" else self.blocks[block][axis]  # type: ignore[index]


def _rows(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Head indices -> the tensor rows they own (size rows each)."""
    return (idx[:, None] * size + torch.arange(size)).reshape(-1)


def slice_state_dict(state: dict, config, block_norms: tuple[str, ...], keep: Keep) -> dict:
    hd = head_dim(config)
    out = {}
    for name, t in state.items():
        block, axes = tensor_axes(name, block_norms)
        for dim, axis in enumerate(axes):
            if axis is None:
                continue
            idx = keep.index(axis, block)
            if axis in ("heads", "kv"):
                idx = _rows(idx, hd)
            t = t.index_select(dim, idx)
        out[name] = t.contiguous()
    return out


@dataclass(frozen=True)
class Shape:
    """A homogeneous decoder shape: every block the same, so the result is a standard config."""

    layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.num_key_value_heads,
        )

    def check_within(self, full: Shape) -> None:
        """A UserError when this shape cannot be cut from `full`."""
        for f in ("layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            value, limit = getattr(self, f), getattr(full, f)
            if not 1 <= value <= limit:
                raise UserError(f"prune: {f}={value} must be between 1 and the model's {limit}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"prune: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (each KV head serves the same number of query heads)"
            )
        per_group = self.num_attention_heads // self.num_key_value_heads
        full_group = full.num_attention_heads // full.num_key_value_heads
        if per_group > full_group:
            raise UserError(
                f"prune: {self.num_attention_heads} query heads over {self.num_key_value_heads} KV heads is "
                f"{per_group} per KV head, but the model has {full_group}: a query head cannot move to another "
                f"KV group; keep num_attention_heads <= {full_group * self.num_key_value_heads}"
            )


def shaped_config(config, shape: Shape):
    """A copy of `config` with `shape`; head_dim is written out because it no longer follows
    from hidden_size / num_attention_heads."""
    cfg = copy.deepcopy(config)
    cfg.head_dim = head_dim(config)
    cfg.hidden_size = shape.hidden_size
    cfg.intermediate_size = shape.intermediate_size
    cfg.num_attention_heads = shape.num_attention_heads
    cfg.num_key_value_heads = shape.num_key_value_heads
    return cfg


def config_refusal(config, shape: Shape) -> str | None:
    """Why transformers refuses `config` cut to `shape` (e.g. llama wants hidden_size a multiple
    of num_attention_heads even with head_dim explicit), or None."""
    cfg = shaped_config(config, shape)
    try:
        cfg.validate()
    except Exception as e:  # huggingface_hub's strict-dataclass error wraps the config's ValueError
        return str(e.__cause__ or e)
    return None


def sliced_model(model, keep: Keep, shape: Shape, block_norms: tuple[str, ...]):
    """A new model of `shape` holding the kept weights of `model` (same depth)."""
    from transformers import AutoModelForCausalLM

    cfg = shaped_config(model.config, shape)
    state = slice_state_dict(model.state_dict(), model.config, block_norms, keep)
    dtype = next(model.parameters()).dtype
    new = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = getattr(cfg, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"pruned weights do not fit the pruned config: missing {missing[:3]}, extra {unexpected[:3]}")
    if tied:
        new.tie_weights()
    return new.eval()


def params_of(config, shape: Shape) -> int:
    """Parameters of `config` cut to `shape`, counted without allocating weights."""
    from transformers import AutoModelForCausalLM

    cfg = shaped_config(config, shape)
    cfg.num_hidden_layers = shape.layers
    for key, value in list(vars(cfg).items()):  # per-layer lists (gemma's layer_types) follow depth
        if isinstance(value, list) and len(value) == config.num_hidden_layers:
            setattr(cfg, key, value[: shape.layers])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())
