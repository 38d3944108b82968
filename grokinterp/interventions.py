"""Interventions on the optimization, written once for a stack of K models (every tensor has a leading model
dimension; a single run is K = 1). Each is a ``TrainConfig`` field, off by default.

Order within one training step (``grokinterp.trainer``):

1. ``weight_noise``: the gradient is computed at ``w + σ·ε`` and the weights are put back exactly (Power et al.'s
   noise before the gradient);
2. ``grad_noise``: ``g ← g + σ·ε``;
3. ``grokfast``: ``g ← g + λ·h`` with ``h`` the EMA or the moving average of past gradients (Lee et al. 2024);
4. ``orthograd``: per weight tensor, ``g ← (g − ⟨w,g⟩/⟨w,w⟩·w)`` rescaled to ``‖g‖`` (Prieto et al. 2025);
5. weight decay toward ``wd_target`` (the origin or the step-0 weights): decoupled for AdamW, an L2 term in the
   gradient for Adam and SGD; then the optimizer's own step, which has no weight decay of its own;
6. ``update_noise``: ``w ← w + σ·ε`` (Power et al.'s noise after the gradient);
7. ``norm_scale``: each model's weights rescaled to their step-0 total norm (Omnigrok), which training started at
   ``norm_scale`` times the initialization's.

Dropout acts inside the forward (``dropout_hooks``). Every random draw comes from a ``torch.Generator`` seeded by
(model_seed, step, what it is for), drawn on the CPU per model, so a model's noise does not depend on the device, on
the other models of its stack, or on where a run was resumed. The state that carries across steps (Grokfast's
filter) is saved with each checkpoint's trainer state.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float

from grokinterp.config import RunConfig

WEIGHT_NOISE, GRAD_NOISE, UPDATE_NOISE, DROPOUT = 1, 2, 3, 4  # streams of random numbers, one per use
GROKFAST_LAMB = {"ema": 2.0, "ma": 5.0}  # Lee et al.'s defaults when --grokfast-lamb is 0
Params = dict[str, torch.Tensor]


def generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The CPU generator of one model's random numbers of ``stream`` at update ``step``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + stream)


def gaussian_like(params: Sequence[torch.Tensor], seeds: Sequence[int], step: int, stream: int) -> list[torch.Tensor]:
    """Standard normal draws shaped like each stacked tensor [K, ...]: model k's from its own generator, tensor by
    tensor in order."""
    out = [torch.empty_like(p) for p in params]
    for k, seed in enumerate(seeds):
        g = generator(seed, step, stream)
        for buf, p in zip(out, params):
            buf[k].copy_(torch.randn(p.shape[1:], generator=g, dtype=p.dtype))
    return out


def per_model(values: Sequence[float], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[K, 1, 1, ...] tensor of per-model scalars, to broadcast against a stacked tensor ``like``."""
    return torch.tensor(values, dtype=dtype or like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


def total_norm(params: Sequence[torch.Tensor]) -> Float[torch.Tensor, " model"]:
    """Each model's ‖θ‖ over the given stacked tensors, in float64."""
    return sum(p.detach().double().pow(2).flatten(1).sum(1) for p in params).sqrt()


class Interventions:
    """The interventions of one stack, and the state they carry (Grokfast's filter)."""

    def __init__(self, configs: Sequence[RunConfig], init: Params | None):
        """``init``: the step-0 values [K, ...] of the trainable parameters, by name (needed by weight decay toward
        the initialization and by the constant norm; None when neither is on)."""
        cfgs = [c.train for c in configs]
        first = cfgs[0]
        self.seeds = [c.model.model_seed for c in configs]
        self.optimizer = first.optimizer
        self.weight_decay = [c.weight_decay for c in cfgs]
        self.wd_target = first.wd_target
        self.weight_noise = [c.weight_noise for c in cfgs]
        self.grad_noise = [c.grad_noise for c in cfgs]
        self.update_noise = [c.update_noise for c in cfgs]
        self.grokfast = first.grokfast
        self.alpha = first.grokfast_alpha
        self.lamb = first.grokfast_lamb or GROKFAST_LAMB.get(first.grokfast, 0.0)
        self.window = first.grokfast_window
        self.orthograd = first.orthograd
        self.norm_scale = first.norm_scale
        self.init = init
        self.norm_target = total_norm(list(init.values())) if init is not None and self.norm_scale else None
        # Grokfast: the EMA per tensor, or a ring of the last ``window`` gradients and how many have been pushed
        self.filter: Params = {}
        self.pushed = 0

    @staticmethod
    def needs_init(config: RunConfig) -> bool:
        """Whether a run needs its step-0 weights while it trains."""
        return config.train.wd_target == "init" or config.train.norm_scale > 0

    # -- 1. before the gradient ---------------------------------------------------------------------------------
    @torch.no_grad()
    def perturb(self, trainable: Params, step: int) -> Callable[[], None] | None:
        """Add the weight noise for this step; returns the function that puts the exact weights back (or None)."""
        if not any(self.weight_noise):
            return None
        names = list(trainable)
        saved = [trainable[n].detach().clone() for n in names]
        noise = gaussian_like([trainable[n] for n in names], self.seeds, step, WEIGHT_NOISE)
        for n, eps in zip(names, noise):
            trainable[n].add_(eps * per_model(self.weight_noise, eps))

        def restore() -> None:
            with torch.no_grad():
                for n, w in zip(names, saved):
                    trainable[n].copy_(w)

        return restore

    # -- 2-5. the gradient and the weight decay ------------------------------------------------------------------
    @torch.no_grad()
    def transform_gradients(self, trainable: Params, step: int, lr: float) -> None:
        """Steps 2 to 5 on ``.grad`` (and, for decoupled weight decay, on the weights) before the optimizer steps."""
        names = [n for n in trainable if trainable[n].grad is not None]
        grads = [trainable[n].grad for n in names]
        if any(self.grad_noise):
            for g, eps in zip(grads, gaussian_like(grads, self.seeds, step, GRAD_NOISE)):
                g.add_(eps * per_model(self.grad_noise, eps))
        if self.grokfast != "none":
            self._grokfast(names, grads)
        if self.orthograd:
            for n, g in zip(names, grads):
                _orthogonalize(g, trainable[n].detach())
        if any(self.weight_decay):
            decoupled = self.optimizer == "adamw"  # w ← w − lr·wd·(w − target), before Adam's own update
            for n, g in zip(names, grads):
                w = trainable[n]
                if decoupled and self.wd_target == "origin":  # 1 − lr·wd formed in float64, as torch's AdamW does
                    w.mul_((1 - lr * per_model(self.weight_decay, w, torch.float64)).to(w.dtype))
                    continue
                toward = w if self.wd_target == "origin" else w - self.init[n]
                wd = per_model(self.weight_decay, w)
                if decoupled:
                    w.sub_(toward * (lr * wd))
                else:  # Adam's and SGD's L2 penalty, folded into the gradient
                    g.add_(toward * wd)

    def _grokfast(self, names: list[str], grads: list[torch.Tensor]) -> None:
        if self.grokfast == "ema":
            for n, g in zip(names, grads):
                h = self.filter.get(n)
                if h is None:  # Lee et al. start the average at the first gradient
                    h = self.filter[n] = g.clone()
                else:
                    h.mul_(self.alpha).add_(g, alpha=1 - self.alpha)
                g.add_(h, alpha=self.lamb)
            return
        slot = self.pushed % self.window
        self.pushed += 1
        for n, g in zip(names, grads):
            ring = self.filter.get(n)
            if ring is None:
                ring = self.filter[n] = torch.zeros(self.window, *g.shape, dtype=g.dtype, device=g.device)
            ring[slot].copy_(g)
            if self.pushed >= self.window:  # the filter starts once the window is full, as in Lee et al.
                g.add_(ring.mean(0), alpha=self.lamb)

    # -- 6-7. after the update ----------------------------------------------------------------------------------
    @torch.no_grad()
    def after_update(self, trainable: Params, step: int) -> None:
        if any(self.update_noise):
            names = list(trainable)
            for n, eps in zip(names, gaussian_like([trainable[n] for n in names], self.seeds, step, UPDATE_NOISE)):
                trainable[n].add_(eps * per_model(self.update_noise, eps))
        if self.norm_target is not None:
            self.hold_norm(trainable)

    @torch.no_grad()
    def hold_norm(self, trainable: Params) -> None:
        """Rescale each model's weights to its target total norm."""
        scale = self.norm_target / total_norm(list(trainable.values()))
        for w in trainable.values():
            w.mul_(per_model(scale.tolist(), w))

    # -- state across steps -------------------------------------------------------------------------------------
    def keep(self, index: list[int]) -> None:
        """Keep the models at stack positions ``index`` (the others finished)."""
        for name in ("seeds", "weight_decay", "weight_noise", "grad_noise", "update_noise"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in index])
        if self.init is not None:
            self.init = {n: t[index] for n, t in self.init.items()}
        if self.norm_target is not None:
            self.norm_target = self.norm_target[index]
        dim = 1 if self.grokfast == "ma" else 0
        self.filter = {n: t.index_select(dim, torch.tensor(index, device=t.device)) for n, t in self.filter.items()}

    def state(self, k: int) -> dict[str, Any]:
        """Model ``k``'s filter state, for its trainer state file (empty when Grokfast is off)."""
        if not self.filter:
            return {}
        dim = 1 if self.grokfast == "ma" else 0  # the ring's model dimension comes after the window's
        return {"grokfast": {n: t.select(dim, k).clone() for n, t in self.filter.items()}, "grokfast_pushed": self.pushed}

    def load_state(self, states: Sequence[dict[str, Any]], device: torch.device) -> None:
        """Restore the filter state of every model (``state(k)`` of each, as saved)."""
        if not states or not states[0].get("grokfast"):
            return
        dim = 1 if self.grokfast == "ma" else 0
        self.filter = {n: torch.stack([s["grokfast"][n] for s in states], dim=dim).to(device)
                       for n in states[0]["grokfast"]}
        self.pushed = int(states[0]["grokfast_pushed"])


def _orthogonalize(g: torch.Tensor, w: torch.Tensor) -> None:
    """⊥Grad on one stacked tensor, per model: g ← (g − (⟨w,g⟩/⟨w,w⟩)·w) · ‖g‖/‖g⊥‖ (the 1e-30 guards a zero
    weight or a gradient along the weights)."""
    dims = tuple(range(1, g.dim()))
    proj = (w * g).sum(dims, keepdim=True) / ((w * w).sum(dims, keepdim=True) + 1e-30)
    norm = g.pow(2).sum(dims, keepdim=True).sqrt()
    g.sub_(proj * w)
    g.mul_(norm / (g.pow(2).sum(dims, keepdim=True).sqrt() + 1e-30))


def dropout_hooks(n_layers: int, resid: float, attn: float, g: torch.Generator) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks that apply (inverted) dropout, GPT-2's placement: ``resid`` on the embeddings
    entering block 0 and on every attention and MLP output before it joins the residual stream, ``attn`` on the
    attention pattern. Masks are drawn from ``g`` on the CPU, in the forward's fixed order of hooks."""

    def drop(rate: float):
        def hook(x: torch.Tensor, hook=None) -> torch.Tensor:
            keep = torch.rand(x.shape, generator=g) >= rate
            return x * keep.to(x.device, x.dtype) / (1 - rate)

        return hook

    hooks = []
    if resid > 0:
        hooks.append(("blocks.0.hook_resid_pre", drop(resid)))
    for layer in range(n_layers):
        if attn > 0:
            hooks.append((f"blocks.{layer}.attn.hook_pattern", drop(attn)))
        if resid > 0:
            hooks += [(f"blocks.{layer}.hook_attn_out", drop(resid)), (f"blocks.{layer}.hook_mlp_out", drop(resid))]
    return hooks
