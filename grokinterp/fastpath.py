"""An exact fast forward for training: the answer logits of a 1-layer model, computed from per-token tables.

Every input is ``[a, b, =]`` and only the last position is scored. In layer 0 the keys, values and the query
depend only on (token, position), and the query is needed only at position 2, where the token is always ``=``. So
each step first builds small tables over the vocabulary (attention scores and values of every token at positions
0 and 1, and those of ``=`` at position 2), then every row only gathers two table entries, takes a softmax over
three scores, and runs the MLP and the unembedding at the last position. ``HookedTransformer.forward`` does all of
that at all three positions for every row, about three times the arithmetic and many more kernel launches.

It is the same function as ``grokinterp.model.answer_logits`` (up to float rounding) and reads the model's own
parameters, so ``loss.backward()`` fills ``model.W_E.grad`` and friends and any optimizer works unchanged. Hooks
attached to the model do not run. Rows must end in ``=`` (every row of every task does): ``fast_answer_logits``
checks that, ``answer_logits_from_params`` assumes it.

On Nanda et al.'s model (p = 113, 3830 training rows) a full-batch AdamW step takes about 56 ms of CPU instead of
about 250 ms; what is left is almost all the MLP and unembedding matmuls that the answer needs anyway.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS, apply_softcap

from grokinterp.model import N_CTX

NORMALIZATIONS = (None, "LN", "LNPre")
# The very functions TransformerLens calls (its gelu_new is not torch's tanh gelu); xielu has parameters of its own
# and is left out.
ACTIVATIONS = {name: fn for name, fn in SUPPORTED_ACTIVATIONS.items() if name != "xielu"}
# Config switches that change the maths of a block (their default is the plain GPT-2 block we compute).
UNSUPPORTED_FLAGS = (
    "use_local_attn",
    "use_qk_norm",
    "use_logn_attn",
    "use_attention_sinks",
    "post_embedding_ln",
    "use_normalization_before_and_after",
    "parallel_attn_mlp",
    "gated_mlp",
    "final_rms",
    "load_in_4bit",
)


def unsupported_reason(cfg: HookedTransformerConfig) -> str | None:
    """None when the fast path computes exactly this model's answer logits; else a short reason (e.g. 'n_layers=2').

    A second layer would need the full residual stream at every position, which is the slow path again."""
    if cfg.n_layers != 1:
        return f"n_layers={cfg.n_layers}"
    if cfg.n_ctx < N_CTX:
        return f"n_ctx={cfg.n_ctx}"
    if cfg.positional_embedding_type != "standard":
        return f"positional_embedding_type={cfg.positional_embedding_type}"
    if cfg.normalization_type not in NORMALIZATIONS:
        return f"normalization_type={cfg.normalization_type}"
    if cfg.dtype not in (torch.float32, torch.float64):
        return f"dtype={cfg.dtype}"  # TransformerLens' LayerNorm computes half precision in float32; we do not
    if cfg.original_architecture is not None:
        return f"original_architecture={cfg.original_architecture}"
    if cfg.n_key_value_heads is not None:
        return "grouped-query attention"
    if cfg.clip_qkv is not None:
        return "clip_qkv"
    if cfg.num_experts:
        return "mixture of experts"
    for flag in UNSUPPORTED_FLAGS:
        if getattr(cfg, flag):
            return flag
    if not cfg.attn_only and cfg.act_fn not in ACTIVATIONS:
        return f"act_fn={cfg.act_fn}"
    return None


def _layer_norm(x: Tensor, params: Mapping[str, Tensor], name: str, cfg: HookedTransformerConfig) -> Tensor:
    """TransformerLens' LayerNorm (with weight and bias ``name.w``, ``name.b``) for 'LN', else LayerNormPre.

    F.layer_norm divides by sqrt(biased variance + eps), the same quantity TransformerLens spells out."""
    if cfg.normalization_type == "LN":
        return F.layer_norm(x, x.shape[-1:], params[f"{name}.w"], params[f"{name}.b"], cfg.eps)
    return F.layer_norm(x, x.shape[-1:], None, None, cfg.eps)


def _normalize(x: Tensor, params: Mapping[str, Tensor], name: str, cfg: HookedTransformerConfig) -> Tensor:
    """The block's normalization ``name``: the identity for a model without normalization."""
    return x if cfg.normalization_type is None else _layer_norm(x, params, name, cfg)


def _mlp(x: Float[Tensor, "batch d_model"], params: Mapping[str, Tensor], cfg: HookedTransformerConfig) -> Tensor:
    pre = torch.addmm(params["blocks.0.mlp.b_in"], x, params["blocks.0.mlp.W_in"])
    post = ACTIVATIONS[cfg.act_fn](pre)
    if cfg.is_layer_norm_activation():  # solu_ln normalizes the neurons even in a model without normalization
        post = _layer_norm(post, params, "blocks.0.mlp.ln", cfg)
    return torch.addmm(params["blocks.0.mlp.b_out"], post, params["blocks.0.mlp.W_out"])


def answer_logits_from_params(
    params: Mapping[str, Tensor], tokens: Int[Tensor, "batch 3"], cfg: HookedTransformerConfig
) -> Float[Tensor, "batch d_vocab_out"]:
    """The answer logits of the 1-layer model with these parameters (TransformerLens state-dict names).

    A pure function of ``params`` (no in-place ops, no branching on tensor values), so it works under
    ``torch.func.functional_call``, ``grad`` and ``vmap`` over a leading model dimension of params and tokens.
    Position 2 is assumed to hold ``=`` (token ``d_vocab - 1``); see the module docstring.
    """
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise ValueError(f"the fast answer-logits path does not support this model ({reason})")
    if tokens.shape[-1] != N_CTX:
        raise ValueError(f"the fast path needs rows [a, b, =] of {N_CTX} tokens, got {tokens.shape[-1]}")
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_Q, W_K, W_V, W_O = (params[f"blocks.0.attn.W_{m}"] for m in "QKVO")
    b_Q, b_K, b_V, b_O = (params[f"blocks.0.attn.b_{m}"] for m in "QKVO")
    n_heads, d_model, d_head = W_Q.shape
    equals = cfg.d_vocab - 1

    # The residual stream entering the block: every token at positions 0 and 1, and "=" at position 2.
    resid_ab = W_E.unsqueeze(0) + W_pos[:2].unsqueeze(1)  # [2, d_vocab, d_model]
    resid_eq = W_E[equals] + W_pos[2]  # [d_model]
    x_ab = _normalize(resid_ab, params, "blocks.0.ln1", cfg)
    x_eq = _normalize(resid_eq, params, "blocks.0.ln1", cfg)

    # The one query, folded into the keys: score(token at pos i) = x_i · (W_K q) + b_K · q, for each head.
    attn_scale = cfg.attn_scale if cfg.use_attn_scale else 1.0  # (scale_attn_by_inverse_layer_idx is ×1 in layer 0)
    q = torch.einsum("d,hde->he", x_eq, W_Q) + b_Q  # [n_heads, d_head]
    qk = torch.einsum("hde,he->dh", W_K, q)  # [d_model, n_heads]
    q_bias = (b_K * q).sum(-1)  # [n_heads]
    scores_ab = (x_ab @ qk + q_bias) / attn_scale  # [2, d_vocab, n_heads]
    score_eq = (x_eq @ qk + q_bias) / attn_scale  # [n_heads]
    W_V_flat = W_V.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
    v_ab = x_ab @ W_V_flat + b_V.reshape(-1)  # [2, d_vocab, n_heads * d_head]
    v_eq = x_eq @ W_V_flat + b_V.reshape(-1)  # [n_heads * d_head]

    # Per row: gather the two tables' entries, softmax over the three positions, mix the values.
    a, b = tokens[:, 0], tokens[:, 1]
    scores = torch.stack([scores_ab[0][a], scores_ab[1][b], score_eq.expand(a.shape[0], n_heads)], dim=-1)
    scores = apply_softcap(scores, cfg.attn_scores_soft_cap)
    pattern = scores.softmax(dim=-1)  # [batch, n_heads, 3]; position 2 sees all three, so no causal mask
    z = (
        pattern[..., 0:1] * v_ab[0][a].reshape(-1, n_heads, d_head)
        + pattern[..., 1:2] * v_ab[1][b].reshape(-1, n_heads, d_head)
        + pattern[..., 2:3] * v_eq.reshape(n_heads, d_head)
    )  # [batch, n_heads, d_head]
    attn_out = torch.addmm(b_O, z.reshape(-1, n_heads * d_head), W_O.reshape(n_heads * d_head, d_model))

    resid = resid_eq + attn_out  # [batch, d_model]
    if not cfg.attn_only:
        resid = resid + _mlp(_normalize(resid, params, "blocks.0.ln2", cfg), params, cfg)
    resid = _normalize(resid, params, "ln_final", cfg)
    logits = torch.addmm(params["unembed.b_U"], resid, params["unembed.W_U"])
    return apply_softcap(logits, cfg.output_logits_soft_cap)


def fast_answer_logits(model: HookedTransformer, tokens: Int[Tensor, "batch 3"]) -> Float[Tensor, "batch d_vocab_out"]:
    """``answer_logits(model, tokens)`` by the fast path, reading (not copying) the model's parameters.

    Refuses rows whose last token is not ``=``, which the fast path would get wrong. That check reads the tokens
    (one device sync on a GPU, as the training loop's finite-loss check already does each step)."""
    if bool((tokens[:, 2] != model.cfg.d_vocab - 1).any()):
        raise ValueError(f"the fast path needs rows [a, b, =]; some rows do not end in '=' ({model.cfg.d_vocab - 1})")
    return answer_logits_from_params(dict(model.named_parameters()), tokens, model.cfg)
