"""The one place a config becomes a TransformerLens ``HookedTransformer``.

A later move to TransformerLens 4's ``TransformerBridge`` touches this file only: everything else builds models
through ``build_model`` and reads logits through ``answer_logits``. Weights are stored in TransformerLens'
state-dict naming (``embed.W_E``, ``blocks.0.attn.W_Q``, ...).
"""

import contextlib
import io
import warnings

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer, HookedTransformerConfig

from grokinterp.config import ModelConfig

N_CTX = 3  # [a, b, =]


def hooked_config(cfg: ModelConfig, n_symbols: int, device: str | torch.device = "cpu") -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp if cfg.d_mlp > 0 else None,
        attn_only=cfg.d_mlp == 0,
        act_fn=cfg.act_fn,
        normalization_type=None if cfg.normalization == "none" else cfg.normalization,
        d_vocab=n_symbols + 1,  # the answers plus "="
        d_vocab_out=n_symbols,  # "=" is never an answer
        n_ctx=N_CTX,
        init_weights=True,
        device=str(device),
    )


def build_model(cfg: ModelConfig, n_symbols: int, device: str | torch.device = "cpu") -> HookedTransformer:
    """A freshly initialized model. Initialization runs on the CPU from ``cfg.model_seed`` alone (the global RNG is
    left as it was), so the same config gives the same weights on every device."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        torch.manual_seed(cfg.model_seed)
        model = HookedTransformer(hooked_config(cfg, n_symbols, "cpu"))
    if cfg.freeze_biases:
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("b_"):
                param.requires_grad_(False)
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to device"
        return model.to(device)


def answer_logits(model: HookedTransformer, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch d_vocab_out"]:
    """Logits at the last position (the answer); the only ones the task scores."""
    return model(tokens)[:, -1, :]
