"""The optimizers of stacked training, restated for parameters stacked along a leading run dimension.

``torch.optim``'s update rules (Adam/AdamW with β = (0.9, 0.999), ε = 1e-8; SGD with momentum 0.9,
dampening 0) act elementwise, so one step over a ``[K, …]`` tensor is K independent steps, each with
its own learning rate and weight decay (broadcast from ``[K]``). A parameter's step count advances
only when its step has a gradient for it, as in ``torch.optim``. ``heads/sweeps/stacked.py`` owns the
state; these functions only read and update it.
"""
from __future__ import annotations

import torch

from heads.blocks.optim import SGD_MOMENTUM, scheduled_lr


def load_optimizer_state(trainers: list, state: dict[str, dict], device: torch.device) -> None:
    """Stack the trainers' own optimizer state into ``state`` (a run resumed from a checkpoint has moments)."""
    names = [n for n, _ in trainers[0].model.named_parameters()]
    slots = [[t.model.optimizer.state.get(p, {}) for p in t.model.parameters()] for t in trainers]
    for i, name in enumerate(names):
        per_run = [s[i] for s in slots]
        if all(per_run):
            own = state[f"method.{name}"]
            for key in per_run[0]:
                if key != "step":
                    own[key] = torch.stack([r[key].to(device) for r in per_run])
            own["step"] = int(per_run[0].get("step", 0))


def stacked_step(kind: str, params: dict, state: dict, grads: dict, lr: torch.Tensor, wd: torch.Tensor,
                 prefixes=None) -> None:
    """One ``kind`` (adam, adamw, sgd) step of every stacked run, on the parameters named by ``prefixes``
    (all if None): ``lr`` and ``wd`` hold one value per run."""
    for name, p in params.items():
        if prefixes is not None and not name.removeprefix("method.").startswith(prefixes):
            continue
        g, slot = grads[name], state[name]
        slot["step"] += 1
        shape = (p.shape[0],) + (1,) * (p.dim() - 1)
        rate, decay = lr.view(shape), wd.view(shape)
        if kind == "sgd":
            d = g + decay * p
            buf = slot.get("momentum_buffer")
            slot["momentum_buffer"] = d.clone() if buf is None else buf.mul_(SGD_MOMENTUM).add_(d)
            p.sub_(rate * slot["momentum_buffer"])
            continue
        if kind == "adamw":
            p.mul_(1 - rate * decay)
            d = g
        else:  # adam: L2 added to the gradient
            d = g + decay * p
        beta1, beta2, eps, t = 0.9, 0.999, 1e-8, slot["step"]
        m = slot.setdefault("exp_avg", torch.zeros_like(p))
        v = slot.setdefault("exp_avg_sq", torch.zeros_like(p))
        m.lerp_(d, 1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        p.sub_(rate / (1 - beta1 ** t) * m / (v.sqrt() / (1 - beta2 ** t) ** 0.5 + eps))


def stacked_rates(trainers: list, epoch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K]`` learning rates (each run's own schedule at ``epoch``) and weight decays of the stacked runs."""
    lr = [scheduled_lr(t.cfg.lr, t.cfg.schedule, epoch, t.cfg.epochs) for t in trainers]
    wd = [t.cfg.weight_decay for t in trainers]
    return torch.tensor(lr, device=device), torch.tensor(wd, device=device)
