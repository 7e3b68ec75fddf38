"""Grounding DINO's fusion layers (groundingdino's BiAttentionBlock / BiMultiHeadAttention) at inference,
same arithmetic up to float rounding, in a form that exports to OpenVINO as few passes over image-sized
tensors.

* ``text_image_attention``: the attention with its image-side projections moved onto the text (the
  image tokens meet only (heads x text tokens)-wide matrices), as 2-D products, masks added as -inf.
* ``fusion_softmax`` (``gsam::fusion_softmax``): the two softmaxes with groundingdino's shift, clamps and
  masks as one operation, which ``openvino_ops`` converts to its C++ kernel
  (``backend/csrc/fusion_softmax.cpp``); on torch it runs ``softmaxes``, the reference it is tested
  against.
* ``fusion_layer``: the block (layer norms, attention, scaled residuals).
"""

from __future__ import annotations

from typing import Any

import torch


def fusion_layer(block: Any, image: torch.Tensor, text: torch.Tensor, image_padding: torch.Tensor | None,
                 text_padding: torch.Tensor | None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BiAttentionBlock.forward at inference (drop path off) with ``text_image_attention`` (``fused``: its
    softmaxes as the one ``fusion_softmax`` operation). As groundingdino's, the residual is added to the
    layer-normed tokens."""
    image, text = block.layer_norm_v(image), block.layer_norm_l(text)
    image_delta, text_delta = text_image_attention(block.attn, image, text, image_padding, text_padding, fused,
                                                   image_scale=block.gamma_v)
    return image + image_delta, text + block.gamma_l * text_delta


def text_image_attention(attention: Any, image: torch.Tensor, text: torch.Tensor,
                         image_padding: torch.Tensor | None, text_padding: torch.Tensor | None,
                         fused: bool = False, image_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """groundingdino's BiMultiHeadAttention.forward at inference, with its image-side projections moved
    onto the text.

    groundingdino projects every image token three times to ``embed_dim`` (1024 on SwinT-OGC: the
    query, the value for the text side, and the output's input), each as wide as 4x the features, and
    moves them between token-major and head-major layouts. The logits and both outputs are linear in
    those projections, so the same products can be taken on the text side instead: with W_q, W_vv, W_o
    the query, image-value and image-output projections and k, u the text's key and value,

    * logits[i, h, t] = scale * (W_q v_i + b_q)_h . k_ht = v_i . (scale * W_q,h^T k_ht) + scale * b_q,h . k_ht
    * text output[h, t] = sum_i p_l[i, h, t] (W_vv v_i + b_vv)_h = W_vv,h (sum_i p_l[i, h, t] v_i) + (sum_i p_l) b_vv,h
    * image output[i] = W_o (p_v[i, h, t] u_ht)_(h, t) + b_o = sum_(h, t) p_v[i, h, t] (W_o,h u_ht) + b_o

    so the image tokens meet only (heads x text tokens)-wide matrices (108 columns for a 27-token
    caption, at most heads x 256 = 1024), in their own layout (image tokens, heads, text tokens): no
    transposes of image-sized tensors. The softmaxes, the clamps, the global-max shift and both masks
    are groundingdino's, on the same logits; the products are summed in another order (float rounding).

    Arguments:
      attention: groundingdino's (untyped) BiMultiHeadAttention: its projections, ``num_heads``, ``head_dim``,
        ``scale``, ``stable_softmax_2d``, ``clamp_min_for_underflow``, ``clamp_max_for_overflow``.
      image: (bs, I, v_dim) image tokens (after the block's layer norm).
      text: (bs, T, l_dim) text tokens (after the block's layer norm).
      image_padding: (bs, I) bool, True on padding tokens, or None.
      text_padding: (bs, T) bool, True on padding tokens, or None.
      fused: the softmaxes as the one ``fusion_softmax`` operation (for export to OpenVINO).
      image_scale: (v_dim,) multiplies the image delta (BiAttentionBlock's gamma_v), folded into the text's
        output matrix and the bias: no pass over the image tokens of its own.
    Returns:
      (image delta (bs, I, v_dim), text delta (bs, T, l_dim)), as groundingdino's forward returns them
      (the image delta times ``image_scale``).
    """
    bs, tokens, _ = text.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    keys = attention.l_proj(text).view(bs, tokens, heads, head_dim)
    # The weights in the activations' dtype: einsum is not autocast, and a bf16 engine's text is bf16 here.
    query_weight = attention.v_proj.weight.view(heads, head_dim, -1).to(keys.dtype)  # heads, head_dim, v_dim
    keys_on_image = torch.einsum("bthd,hdv->bhtv", keys, query_weight) * attention.scale  # bs, heads, T, v_dim
    key_bias = torch.einsum("bthd,hd->bht", keys, attention.v_proj.bias.view(heads, head_dim).to(keys.dtype)
                            ) * attention.scale
    values = attention.values_l_proj(text).view(bs, tokens, heads, head_dim)
    output_weight = attention.out_v_proj.weight.view(-1, heads, head_dim).to(values.dtype)  # v_dim, heads, head_dim
    values_on_image = torch.einsum("bthd,vhd->bhtv", values, output_weight).flatten(1, 2)  # bs, heads * T, v_dim
    output_bias = attention.out_v_proj.bias
    if image_scale is not None:
        values_on_image = values_on_image * image_scale.to(values_on_image.dtype)
        output_bias = output_bias * image_scale
    image_deltas, pooled, weight_sums = [], [], []
    # One image's products as 2-D matmuls: batched ones export as an image-sized Broadcast. (For the
    # graph's one image, a reshape: image[0] exports as a Gather, a copy.)
    images = (image.flatten(0, 1),) if bs == 1 else image.unbind(0)
    for b in range(bs):
        delta, image_pooled, weight_sum = _image_side(
            attention, images[b], keys_on_image[b].flatten(0, 1), key_bias[b].flatten(), values_on_image[b],
            output_bias, None if image_padding is None else image_padding[b],
            None if text_padding is None else text_padding[b], fused)
        image_deltas.append(delta)
        pooled.append(image_pooled)
        weight_sums.append(weight_sum)
    value_weight = attention.values_v_proj.weight.view(heads, head_dim, -1)
    pooled_text = torch.stack(pooled).view(bs, heads, tokens, -1)  # sum_i p_l v_i: bs, heads, T, v_dim
    weight_sum_text = torch.stack(weight_sums).view(bs, heads, tokens, 1)
    text_output = (torch.einsum("bhtv,hdv->bthd", pooled_text, value_weight.to(pooled_text.dtype))
                   + (weight_sum_text * attention.values_v_proj.bias.view(1, heads, 1, head_dim)).transpose(1, 2))
    text_delta = attention.out_l_proj(text_output.reshape(bs, tokens, heads * head_dim))
    return torch.stack(image_deltas), text_delta


def _image_side(attention: Any, image: torch.Tensor, keys_on_image: torch.Tensor, key_bias: torch.Tensor,
                values_on_image: torch.Tensor, output_bias: torch.Tensor, image_padding: torch.Tensor | None,
                text_padding: torch.Tensor | None, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``text_image_attention`` for one image, from the text's matrices.

    Arguments:
      image: (I, v_dim) the image's tokens.
      keys_on_image: (heads * T, v_dim) the scaled text keys through the query projection.
      key_bias: (heads * T,) the query projection's bias against the scaled keys.
      values_on_image: (heads * T, v_dim) the text values through the image's output projection.
      output_bias: (v_dim,) that projection's bias.
      image_padding: (I,) bool, True on padding tokens, or None.
      text_padding: (T,) bool, True on padding tokens, or None.
      fused: the softmaxes as ``fusion_softmax``.
    Returns:
      (image delta (I, v_dim), pooled image tokens (heads * T, v_dim): sum_i p_l[i, h, t] v_i, the text
      side's weight sums (heads * T,)).
    """
    heads, tokens = attention.num_heads, keys_on_image.shape[0] // attention.num_heads
    logits = torch.addmm(key_bias, image, keys_on_image.t())  # I, heads * T
    settings = (heads, bool(attention.stable_softmax_2d), bool(attention.clamp_min_for_underflow),
                bool(attention.clamp_max_for_overflow))
    if fused:
        if image_padding is None:
            image_padding = logits.new_zeros(logits.shape[0], dtype=torch.bool)
        if text_padding is None:
            text_padding = logits.new_zeros(tokens, dtype=torch.bool)
        to_text, to_image = fusion_softmax(logits, image_padding, text_padding, *settings)
    else:
        to_text, to_image = softmaxes(logits, image_padding, text_padding, *settings)
    delta = torch.addmm(output_bias.to(to_image.dtype), to_image, values_on_image.to(to_image.dtype))
    return delta, to_text.t() @ image.to(to_text.dtype), to_text.sum(0)


def softmaxes(logits: torch.Tensor, image_padding: torch.Tensor | None, text_padding: torch.Tensor | None,
              heads: int, stable: bool, clamp_min: bool, clamp_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """groundingdino's two softmaxes of the fusion logits, with its shift, clamps and masks.

    Arguments:
      logits: (I, heads * T) image tokens against each head's text tokens (head-major).
      image_padding: (I,) bool, True on padding tokens, or None.
      text_padding: (T,) bool, True on padding tokens, or None.
      heads: the attention's heads.
      stable, clamp_min, clamp_max: the module's ``stable_softmax_2d`` (shift by the global maximum),
        ``clamp_min_for_underflow``, ``clamp_max_for_overflow`` (clamps at -+50000).
    Returns:
      (to_text (I, heads * T): each column softmaxed over the image tokens, to_image (I, heads * T):
      softmaxed over each head's text tokens).
    """
    logits = logits.view(logits.shape[0], heads, -1)  # I, heads, T: groundingdino's (bs * heads, I, T), permuted
    if stable:
        logits = logits - logits.max()
    logits = _clamped(logits, clamp_min, clamp_max)
    to_text = _clamped(logits - logits.max(dim=0, keepdim=True)[0], clamp_min, clamp_max)
    # The masks as added 0 / -inf (x + 0 == x, x + -inf == -inf: masked_fill's result) fold into the
    # elementwise ops around them; a Select is one more pass over an (I, heads, T) tensor.
    if image_padding is not None:
        to_text = to_text + _masked_bias(image_padding, to_text.dtype)[:, None, None]
    if text_padding is not None:
        logits = logits + _masked_bias(text_padding, logits.dtype)
    return to_text.softmax(dim=0).flatten(1), logits.softmax(dim=-1).flatten(1)


@torch.library.custom_op("gsam::fusion_softmax", mutates_args=())
def fusion_softmax(logits: torch.Tensor, image_padding: torch.Tensor, text_padding: torch.Tensor, heads: int,
                   stable: bool, clamp_min: bool, clamp_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmaxes`` as one operation (``gsam::fusion_softmax``), both masks given: exported as one node,
    which ``openvino_ops`` converts to its C++ kernel (``backend/csrc/fusion_softmax.cpp``: three passes
    over the logits instead of about ten). On torch: ``softmaxes``."""
    return softmaxes(logits, image_padding, text_padding, heads, stable, clamp_min, clamp_max)


@fusion_softmax.register_fake
def _fusion_softmax_shape(logits: torch.Tensor, image_padding: torch.Tensor, text_padding: torch.Tensor, heads: int,
                          stable: bool, clamp_min: bool, clamp_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.new_empty(logits.shape), logits.new_empty(logits.shape)


def _masked_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``mask`` is False, -inf where True."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _clamped(logits: torch.Tensor, clamp_min: bool, clamp_max: bool) -> torch.Tensor:
    """groundingdino's clamps of the fusion logits (for half precision's range), where the module has them on."""
    if clamp_min:
        logits = logits.clamp(min=-50000)
    if clamp_max:
        logits = logits.clamp(max=50000)
    return logits
