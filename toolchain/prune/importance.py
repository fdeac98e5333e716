"""How much each hidden channel, head and MLP neuron matters, measured on calibration text.

- `activation` (Minitron's style, one forward pass): a hidden channel scores the mean |output|
  of every norm over the residual stream; an MLP neuron its mean |activation| times the norm
  of the down-projection column it feeds (what it adds to the residual); a query head the mean
  norm of what it writes through o_proj.
- `taylor` (one backward pass of the next-token loss): a structure scores |sum of w * dL/dw|
  over the weights it owns, the first-order estimate of the loss change when it is removed.
- `random`: seeded noise, the baseline importance has to beat.
A KV head scores the sum of its query heads (plus its own k/v weights for `taylor`), so a KV
group is kept or dropped whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolchain.prune.axes import head_dim, tensor_axes


@dataclass
class Scores:
    hidden: torch.Tensor  # [hidden_size]
    blocks: list[dict[str, torch.Tensor]]  # per block: heads [n_heads], kv [n_kv], mlp [intermediate]


def _empty(config) -> Scores:
    h, i = config.hidden_size, config.intermediate_size
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    blocks = [
        {"heads": torch.zeros(nq), "kv": torch.zeros(nkv), "mlp": torch.zeros(i)}
        for _ in range(config.num_hidden_layers)
    ]
    return Scores(torch.zeros(h), blocks)


def _add_group_sums(scores: Scores) -> Scores:
    for b in scores.blocks:
        per_group = len(b["heads"]) // len(b["kv"])
        b["kv"] = b["kv"] + b["heads"].view(len(b["kv"]), per_group).sum(-1)
    return scores


def _batches(calib: torch.Tensor, batch: int):
    for i in range(0, len(calib), batch):
        yield calib[i : i + batch]


@torch.no_grad()
def activation_scores(model, calib: torch.Tensor, block_norms: tuple[str, ...], batch: int = 4) -> Scores:
    cfg = model.config
    scores, hd = _empty(cfg), head_dim(cfg)
    hooks = []

    def on_norm(_m, _inp, out):
        scores.hidden.add_(out.detach().float().abs().mean(dim=(0, 1)))

    def on_down(b, down):
        col_norm = down.weight.float().norm(dim=0)

        def hook(_m, inp):
            scores.blocks[b]["mlp"].add_(inp[0].float().abs().mean(dim=(0, 1)) * col_norm)

        return hook

    def on_o(b, o_proj):
        nq = cfg.num_attention_heads
        w = o_proj.weight.float().view(o_proj.weight.shape[0], nq, hd)  # [hidden, heads, head_dim]

        def hook(_m, inp):
            a = inp[0].float().view(*inp[0].shape[:2], nq, hd)
            contrib = torch.einsum("bsnd,hnd->bsnh", a, w).norm(dim=-1)  # what each head writes
            scores.blocks[b]["heads"].add_(contrib.mean(dim=(0, 1)))

        return hook

    for b, layer in enumerate(model.model.layers):
        for name in block_norms:
            hooks.append(getattr(layer, name).register_forward_hook(on_norm))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(b, layer.mlp.down_proj)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(b, layer.self_attn.o_proj)))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    try:
        for x in _batches(calib, batch):
            model.model(x, use_cache=False)  # the body only: the LM head's logits are not needed
    finally:
        for h in hooks:
            h.remove()
    return _add_group_sums(scores)


def taylor_scores(model, calib: torch.Tensor, block_norms: tuple[str, ...], batch: int = 4) -> Scores:
    cfg = model.config
    scores, hd = _empty(cfg), head_dim(cfg)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for x in _batches(calib, batch):
        # summed over batches (not averaged): only the ranking matters
        model(x, labels=x, use_cache=False).loss.backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.grad is None:
            continue
        block, axes = tensor_axes(name, block_norms)
        wg = (p.detach() * p.grad).float()
        for dim, axis in enumerate(axes):
            if axis is None:
                continue
            other = [d for d in range(wg.dim()) if d != dim]
            per_row = wg.sum(dim=other) if other else wg
            if axis in ("heads", "kv"):
                per_row = per_row.view(-1, hd).sum(-1)
            target = scores.hidden if axis == "hidden" else scores.blocks[block][axis]  # type: ignore[index]
            target.add_(per_row)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for s in [scores.hidden] + [v for b in scores.blocks for v in b.values()]:
        s.abs_()
    return _add_group_sums(scores)


def random_scores(model, calib: torch.Tensor, block_norms: tuple[str, ...], seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    scores = _empty(model.config)
    scores.hidden = torch.rand(len(scores.hidden), generator=g)
    for b in scores.blocks:
        for k in b:
            b[k] = torch.rand(len(b[k]), generator=g)
    return scores


IMPORTANCE = {"activation": activation_scores, "taylor": taylor_scores, "random": random_scores}
