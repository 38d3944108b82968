"""An exact fast forward for training: the answer logits of a 1-layer model, computed from per-token tables.

Every input is ``[a, b, =]`` and only the last position is scored. In layer 0 the keys, values and the query
depend only on (token, position), and the query is needed only at position 2, where the token is always ``=``. So
each step first builds small tables over the vocabulary (attention scores and values of every token at positions
0 and 1, and those of ``=`` at position 2), then every row only gathers two table entries, takes a softmax over
three scores, and runs the MLP and the unembedding at the last position. ``HookedTransformer.forward`` does all of
that at all three positions for every row, about three times the arithmetic and many more kernel launches.

Two forms of it:

* ``answer_logits_from_params``: any supported model, a pure function that ``vmap`` maps over stacked models
  (``grokinterp.sweep``).
* ``folded_answer_logits``: models without normalization (Nanda et al.'s and the presets), where the maps between
  the attention pattern and the MLP are all linear and fold into tables, saving a third of the matmul FLOPs.
  ``fast_answer_logits`` takes it where it applies.

Both are the same function as ``grokinterp.model.answer_logits`` (tests check logits and gradients to float64
rounding) and read the model's own parameters, so ``loss.backward()`` fills ``model.W_E.grad`` and friends and any
optimizer works unchanged. Hooks attached to the model do not run. Rows must end in ``=`` (every row of every task
does): ``fast_answer_logits`` checks that, the others assume it.

On Nanda et al.'s model (p = 113, 3830 training rows, 2 CPU cores) a full-batch AdamW step takes about 22-30 ms
instead of about 130-170 ms for the model's own forward; a third of it is the matmuls the answer needs anyway
(see the README's benchmark).
"""

import warnings
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


def _layer0(params: Mapping[str, Tensor], tokens: Int[Tensor, "batch 3"], cfg: HookedTransformerConfig):
    """What attention in layer 0 needs, from per-token tables: the residual stream of ``=`` at position 2
    [d_model], each row's attention pattern from the answer position [batch, n_heads, 3] (keys a, b, =), and the
    values of every token at positions 0 and 1 [2, d_vocab, n_heads, d_head] and of ``=`` at 2 [n_heads, d_head]."""
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise ValueError(f"the fast answer-logits path does not support this model ({reason})")
    if tokens.shape[-1] != N_CTX:
        raise ValueError(f"the fast path needs rows [a, b, =] of {N_CTX} tokens, got {tokens.shape[-1]}")
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    W_Q, W_K, W_V = (params[f"blocks.0.attn.W_{m}"] for m in "QKV")
    b_Q, b_K, b_V = (params[f"blocks.0.attn.b_{m}"] for m in "QKV")
    n_heads = W_Q.shape[0]
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
    v_ab = torch.einsum("jvd,hde->jvhe", x_ab, W_V) + b_V  # [2, d_vocab, n_heads, d_head]
    v_eq = torch.einsum("d,hde->he", x_eq, W_V) + b_V  # [n_heads, d_head]

    # Per row: gather the two tables' scores and take a softmax over the three positions.
    a, b = tokens[:, 0], tokens[:, 1]
    # Laid out [batch, 3, n_heads]: torch's softmax over a last dimension of 3 costs twice this one.
    scores = torch.stack([scores_ab[0][a], scores_ab[1][b], score_eq.expand(a.shape[0], n_heads)], dim=1)
    scores = apply_softcap(scores, cfg.attn_scores_soft_cap)
    pattern = scores.softmax(dim=1).transpose(1, 2)  # position 2 sees all three, so no causal mask
    return resid_eq, pattern, v_ab, v_eq


def _answer_resid_mid(params: Mapping[str, Tensor], tokens: Int[Tensor, "batch 3"],
                      cfg: HookedTransformerConfig) -> Float[Tensor, "batch d_model"]:
    """The answer position's residual stream after attention (TransformerLens' ``blocks.0.hook_resid_mid``)."""
    resid_eq, pattern, v_ab, v_eq = _layer0(params, tokens, cfg)
    a, b = tokens[:, 0], tokens[:, 1]
    W_O = params["blocks.0.attn.W_O"]
    n_heads, d_head, d_model = W_O.shape
    z = pattern[..., 0:1] * v_ab[0][a] + pattern[..., 1:2] * v_ab[1][b] + pattern[..., 2:3] * v_eq  # [batch, h, e]
    attn_out = torch.addmm(params["blocks.0.attn.b_O"], z.reshape(-1, n_heads * d_head),
                           W_O.reshape(n_heads * d_head, d_model))
    return resid_eq + attn_out


def answer_mlp_post(model: HookedTransformer, tokens: Int[Tensor, "batch 3"]) -> Float[Tensor, "batch d_mlp"]:
    """The MLP's activations at the answer position (``blocks.0.mlp.hook_post`` at position 2), by the fast path
    (rows [a, b, =]; a model with an MLP that ``unsupported_reason`` accepts)."""
    if model.cfg.attn_only:
        raise ValueError("an attention-only model has no MLP activations")
    params = dict(model.named_parameters())
    x = _normalize(_answer_resid_mid(params, tokens, model.cfg), params, "blocks.0.ln2", model.cfg)
    post = ACTIVATIONS[model.cfg.act_fn](torch.addmm(params["blocks.0.mlp.b_in"], x, params["blocks.0.mlp.W_in"]))
    if model.cfg.is_layer_norm_activation():
        post = _layer_norm(post, params, "blocks.0.mlp.ln", model.cfg)
    return post


def answer_logits_from_params(
    params: Mapping[str, Tensor], tokens: Int[Tensor, "batch 3"], cfg: HookedTransformerConfig
) -> Float[Tensor, "batch d_vocab_out"]:
    """The answer logits of the 1-layer model with these parameters (TransformerLens state-dict names).

    A pure function of ``params`` (no in-place ops, no branching on tensor values), so it works under
    ``torch.func.functional_call``, ``grad`` and ``vmap`` over a leading model dimension of params and tokens.
    Position 2 is assumed to hold ``=`` (token ``d_vocab - 1``); see the module docstring.
    """
    resid = _answer_resid_mid(params, tokens, cfg)
    if not cfg.attn_only:
        resid = resid + _mlp(_normalize(resid, params, "blocks.0.ln2", cfg), params, cfg)
    resid = _normalize(resid, params, "ln_final", cfg)
    logits = torch.addmm(params["unembed.b_U"], resid, params["unembed.W_U"])
    return apply_softcap(logits, cfg.output_logits_soft_cap)


def folded_answer_logits(
    params: Mapping[str, Tensor], tokens: Int[Tensor, "batch 3"], cfg: HookedTransformerConfig
) -> Float[Tensor, "batch d_vocab_out"]:
    """``answer_logits_from_params`` for a model without normalization, with the linear maps folded together.

    Without LayerNorm, everything between the attention pattern and the MLP's activation is linear, and so is
    everything after the activation: the answer's residual stream is ``resid0 + z W_O`` with
    ``z = Σ_j pattern_j · v_j[token_j]``, so the MLP input is ``Σ_j pattern_j · (v_j W_O W_in)[token_j] + const``
    and the direct path to the logits likewise with ``W_O W_U``, while the MLP's output reaches the logits through
    ``W_out W_U`` alone. Per step that is tables over the vocabulary, a weighted sum of 2·n_heads table rows per
    example (``_MixedReadout``), the activation, and one [batch, d_mlp] × [d_mlp, d_vocab_out] matmul: half the
    matmul FLOPs of ``answer_logits_from_params`` (forward and backward, Nanda et al.'s model), and no
    [batch, d_model] activations at all. Not for ``vmap`` (its backward is written by hand)."""
    if cfg.normalization_type is not None:
        raise ValueError(f"the folded path needs a model without normalization, not {cfg.normalization_type}")
    resid_eq, pattern, v_ab, v_eq = _layer0(params, tokens, cfg)
    a, b = tokens[:, 0], tokens[:, 1]
    W_O, W_U = params["blocks.0.attn.W_O"], params["unembed.W_U"]
    resid0 = resid_eq + params["blocks.0.attn.b_O"]  # the part of the answer's stream that is the same in every row
    direct_bias = resid0 @ W_U + params["unembed.b_U"]
    readouts = [torch.einsum("hed,dv->hev", W_O, W_U)]  # [n_heads, d_head, d_vocab_out]
    if not cfg.attn_only:
        W_in, W_out = params["blocks.0.mlp.W_in"], params["blocks.0.mlp.W_out"]
        readouts.append(torch.einsum("hed,dm->hem", W_O, W_in))  # [n_heads, d_head, d_mlp]
    outs = _MixedReadout.apply(pattern, v_ab, v_eq, a, b, *readouts)
    if cfg.attn_only:
        return apply_softcap(outs[0] + direct_bias, cfg.output_logits_soft_cap)
    # In place where it is safe (the Function keeps no outputs): on the CPU a fresh [batch, d_mlp] tensor costs more
    # in page faults than the arithmetic that fills it.
    direct, pre = outs
    pre = pre.add_(resid0 @ W_in + params["blocks.0.mlp.b_in"])
    post = F.relu(pre, inplace=True) if cfg.act_fn == "relu" else ACTIVATIONS[cfg.act_fn](pre)
    if cfg.is_layer_norm_activation():  # solu_ln normalizes the neurons even in a model without normalization
        post = _layer_norm(post, params, "blocks.0.mlp.ln", cfg)
    logits = direct.add_(direct_bias + params["blocks.0.mlp.b_out"] @ W_U).addmm_(post, W_out @ W_U)
    return apply_softcap(logits, cfg.output_logits_soft_cap)


class _MixedReadout(torch.autograd.Function):
    """``z @ R`` for each readout ``R`` [n_heads, d_head, F], where ``z[n, h] = Σ_j pattern[n, h, j] v_j[t_j[n], h]``
    (tokens t = (a, b, =), values as ``_layer0`` gives them), without forming ``z`` or multiplying by ``R`` per row.

    The pattern sums to 1 over the three positions, so ``z = Σ_(j=a,b) pattern_j (v_j[t_j] - v_=) + v_=``: the value
    of ``=`` folds into the tables of a and b and a constant. Forward: the tables ``T = (v - v_=) R`` over the
    vocabulary (one bmm per readout), then an ``embedding_bag`` sums each example's 2·n_heads table rows with the
    pattern as weights, plus ``v_= R``. Backward, by hand, through the tables rather than through ``z``
    (``dR = zᵀ dOut`` and ``dz = dOut Rᵀ`` were each a [batch, d_mlp] × [d_mlp, n_heads·d_head] matmul; this is a
    sixth of their arithmetic):

    * ``dT[r] = Σ_(n, j): row r is n's token at j  pattern[n, h, j] · dOut[n]``: an ``embedding_bag`` over dOut's
      rows with one bag per table row (torch's own backward of ``embedding_bag`` with per-sample weights is a slow
      per-element loop);
    * ``dpattern[n, h, j] = dOut[n] · T[row of n's token at j]``: the entries of ``dOut Tᵀ`` at each example's rows,
      by a sampled matmul (``torch.sparse.sampled_addmm``); 0 for ``=``, whose share the softmax's backward
      accounts for through the other two (its Jacobian ignores a shift common to all three);
    * ``dv = dT Rᵀ`` and ``dR = vᵀ dT``: per-head matmuls over the vocabulary, whatever the batch; ``=`` gets the
      constant's gradient minus the sum of its shares of the tables'."""

    @staticmethod
    def forward(ctx, pattern, v_ab, v_eq, a, b, *readouts):
        batch, n_heads, _ = pattern.shape
        d_vocab = v_ab.shape[1]
        # The tables, head-major: row j·d_vocab + t of head h holds head h's value of token t at position j (j = 0, 1)
        # less that of "=", times R.
        values = (v_ab - v_eq).flatten(0, 1).transpose(0, 1)  # [n_heads, 2·d_vocab, e]
        tables = [torch.bmm(values, readout) for readout in readouts]  # [n_heads, 2·d_vocab, F]
        # Each example's rows in the flattened tables, head-major, so every row of ``index`` increases.
        first = torch.arange(n_heads, device=pattern.device)[:, None] * (2 * d_vocab)  # [n_heads, 1]
        index = torch.stack([a, b + d_vocab], dim=-1)[:, None, :].add(first).flatten(1)  # [batch, 2·n_heads]
        weights = pattern[..., :2].reshape(batch, 2 * n_heads)
        outs = tuple(F.embedding_bag(index, table.flatten(0, 1), per_sample_weights=weights, mode="sum")
                     .add_(v_eq.flatten() @ readout.flatten(0, 1)) for readout, table in zip(readouts, tables))
        ctx.save_for_backward(pattern, values, v_eq, a, b, index, *readouts, *tables)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        pattern, values, v_eq, a, b, index, *saved = ctx.saved_tensors
        readouts, tables = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        d_vocab = values.shape[1] // 2
        d_weights = d_values = d_v_eq = bags = None
        d_readouts: list[Tensor | None] = [None] * len(readouts)
        for i, (readout, table, grad) in enumerate(zip(readouts, tables, grads)):
            if grad is None:
                continue
            grad = grad.contiguous()
            bags = bags or _TableBags(pattern, a, b, index, d_vocab)
            d_table = bags.sum(grad)  # [n_heads, 2·d_vocab, F]
            d_w = bags.sampled(grad, table)  # [batch, n_heads, 2]
            d_v = torch.bmm(d_table, readout.transpose(1, 2))
            grad_sum = grad.sum(0)  # the constant's gradient
            d_eq = readout @ grad_sum  # [n_heads, e]
            d_weights = d_w if d_weights is None else d_weights.add_(d_w)
            d_values = d_v if d_values is None else d_values.add_(d_v)
            d_v_eq = d_eq if d_v_eq is None else d_v_eq.add_(d_eq)
            if ctx.needs_input_grad[5 + i]:
                d_readouts[i] = torch.bmm(values.transpose(1, 2), d_table).add_(v_eq[:, :, None] * grad_sum)
        if d_values is None:
            return (None,) * (5 + len(readouts))
        d_pattern = torch.cat([d_weights, d_weights.new_zeros(d_weights.shape[:2] + (1,))], dim=-1)
        d_v_ab = d_values.unflatten(1, (2, d_vocab)).permute(1, 2, 0, 3)  # [2, d_vocab, n_heads, e]
        return (d_pattern, d_v_ab, d_v_eq.sub_(d_values.sum(1)), None, None, *d_readouts)


class _TableBags:
    """For ``_MixedReadout``'s backward: the transpose of its forward's sum of table rows, and the sampled product
    that gives the pattern's gradient. Built once per backward, from the tokens' orders (no sort of the whole
    index)."""

    def __init__(self, pattern: Float[Tensor, "batch n_heads 3"], a: Int[Tensor, " batch"], b: Int[Tensor, " batch"],
                 index: Int[Tensor, "batch k"], d_vocab: int):
        n_heads = pattern.shape[1]
        # Bag r of head h holds the examples whose token at position r // d_vocab is r % d_vocab, in batch order (a
        # stable sort), so each sums its rows in a fixed order: deterministic.
        by_a, by_b = torch.argsort(a, stable=True), torch.argsort(b, stable=True)
        self.rows = torch.cat([by_a, by_b]).repeat(n_heads)
        self.weights = torch.cat([pattern[by_a, :, 0].T, pattern[by_b, :, 1].T], dim=1).flatten()
        sizes = torch.cat([torch.bincount(a, minlength=d_vocab), torch.bincount(b, minlength=d_vocab)]).repeat(n_heads)
        self.offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        self.index, self.n_heads = index, n_heads

    def sum(self, grad: Float[Tensor, "batch F"]) -> Float[Tensor, "n_heads n_rows F"]:
        """Row r of head h: the sum of pattern[n, h, j] · grad[n] over the examples n whose token at position j
        is that row's token."""
        d_table = F.embedding_bag(self.rows, grad, self.offsets, mode="sum", per_sample_weights=self.weights)
        return d_table.view(self.n_heads, -1, grad.shape[1])

    def sampled(self, grad: Float[Tensor, "batch F"], table: Float[Tensor, "n_heads n_rows F"]
                ) -> Float[Tensor, "batch n_heads 2"]:
        """Entry (n, h, j): grad[n] · table[h, row of n's token at j]."""
        batch, k = self.index.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.sparse_csr_tensor(
                torch.arange(0, batch * k + 1, k, device=grad.device), self.index.flatten(), grad.new_zeros(batch * k),
                size=(batch, table.shape[0] * table.shape[1]), check_invariants=False)
            return torch.sparse.sampled_addmm(rows, grad, table.flatten(0, 1).T, beta=0.0).values().view(batch, -1, 2)


def fast_answer_logits(model: HookedTransformer, tokens: Int[Tensor, "batch 3"]) -> Float[Tensor, "batch d_vocab_out"]:
    """``answer_logits(model, tokens)`` by the fast path, reading (not copying) the model's parameters: folded
    (``folded_answer_logits``) for a model without normalization on a CPU or CUDA device, else unfolded.

    Refuses rows whose last token is not ``=``, which the fast path would get wrong. That check reads the tokens
    (one device sync on a GPU, as the training loop's finite-loss check already does each step)."""
    if bool((tokens[:, 2] != model.cfg.d_vocab - 1).any()):
        raise ValueError(f"the fast path needs rows [a, b, =]; some rows do not end in '=' ({model.cfg.d_vocab - 1})")
    return fast_logits_from_params(dict(model.named_parameters()), tokens, model.cfg)


def fast_logits_from_params(params: Mapping[str, Tensor], tokens: Int[Tensor, "batch 3"],
                            cfg: HookedTransformerConfig) -> Float[Tensor, "batch d_vocab_out"]:
    """The fast path for one model's parameters (TransformerLens names): folded where it applies (models without
    normalization on a CPU or CUDA device), else unfolded. Assumes rows end in ``=``."""
    forward = folded_answer_logits if _folds(cfg, tokens.device) else answer_logits_from_params
    return forward(params, tokens, cfg)


def _folds(cfg: HookedTransformerConfig, device: torch.device) -> bool:
    """Whether ``fast_answer_logits`` takes the folded path: models without normalization, on the devices whose
    ``embedding_bag`` takes per-row weights."""
    return cfg.normalization_type is None and device.type in ("cpu", "cuda")
