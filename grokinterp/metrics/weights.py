"""Weight norms: the total Σ‖θ‖² and its split over the model's components."""

import torch

from grokinterp.metrics.base import Checkpoint

COMPONENTS = ("embed", "attn", "mlp", "unembed", "ln")


def component_of(name: str) -> str:
    """Which component a TransformerLens parameter name belongs to."""
    if name.startswith(("embed.", "pos_embed.")):
        return "embed"
    if name.startswith("unembed."):
        return "unembed"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    return "ln"


def weight_norms(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Σ‖θ‖² over all parameters (``total``) and over each component (``embed``, ``attn``, ``mlp``, ``unembed``,
    ``ln``), in float64."""
    out = {f"norm_sq_{c}": 0.0 for c in COMPONENTS}
    for name, tensor in state.items():
        out[f"norm_sq_{component_of(name)}"] += float(tensor.detach().double().pow(2).sum())
    out["norm_sq_total"] = sum(out.values())
    return out


def weight_norm_metrics(ckpt: Checkpoint) -> dict[str, float]:
    return weight_norms(dict(ckpt.model.named_parameters()))
