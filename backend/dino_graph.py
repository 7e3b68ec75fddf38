"""Grounding DINO's text-conditioned half as one module that ``torch.export`` traces at dynamic sizes.

``GroundingDINO.forward`` after the backbone (BERT, the fusion/deformable encoder, the two-stage query
selection, the decoder, the heads), with the same modules and the same arithmetic, written so that
nothing reads a tensor's *values* to decide a shape: the level sizes come from the feature maps'
shapes (symbolic under export), the reference grids are ``arange`` (``linspace(0.5, h - 0.5, h)`` with
step 1 is exactly ``arange(h) + 0.5``), and the decoder's NaN print is gone. groundingdino's own
forward iterates a ``spatial_shapes`` tensor into ``linspace``, which export refuses (data-dependent),
and a traced graph fixes the image size. Both runtimes run this module (``dino_runtime``): torch
under autocast, OpenVINO as its exported graph, so they compute the same thing by construction.
One departure, equal on an unpadded image: the decoder's query position embedding reads the
reference box unscaled (groundingdino scales it by level 0's valid ratio, which is 1.0 there), so
features padded with masked tokens (``DinoTextInputs.padded``, OpenVINO's size buckets) predict
what the image does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .dino_fast import DeformableCore, LevelShapes
from .fusion_attention import fusion_layer

if TYPE_CHECKING:
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

LEVELS = 4  # feature levels of both released Grounding DINOs (num_feature_levels)


@dataclass(frozen=True)
class DinoTextInputs:
    """What the text half reads: one image's projected features and one caption's encoding."""

    srcs: tuple[torch.Tensor, ...]  # per level: 1 x 256 x h_l x w_l
    masks: tuple[torch.Tensor, ...]  # per level: 1 x h_l x w_l bool, True on padding
    poss: tuple[torch.Tensor, ...]  # per level: 1 x 256 x h_l x w_l positional embedding
    input_ids: torch.Tensor  # 1 x T int64
    token_type_ids: torch.Tensor  # 1 x T int64
    text_token_mask: torch.Tensor  # 1 x T bool, True on real tokens (one caption: all True)
    text_self_attention_masks: torch.Tensor  # 1 x T x T bool: which tokens of a phrase see each other
    position_ids: torch.Tensor  # 1 x T int64: positions restarting at each phrase

    def flat(self) -> tuple[torch.Tensor, ...]:
        """The graph's positional inputs, in ``DinoTextGraph.forward``'s order."""
        return (*self.srcs, *self.masks, *self.poss, self.input_ids, self.token_type_ids, self.text_token_mask,
                self.text_self_attention_masks, self.position_ids)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """Each level's (h, w)."""
        return tuple((int(src.shape[2]), int(src.shape[3])) for src in self.srcs)

    def padded(self, sizes: tuple[tuple[int, int], ...]) -> DinoTextInputs:
        """These inputs with each level's maps padded on the bottom and right to ``sizes`` ((h, w) per
        level, each at least the level's own): features and positions 0, masks True there.

        groundingdino pads the smaller images of a batch this way, and its text half reads the masks
        wherever sizes matter (the valid ratios that place reference points and proposals, padded
        tokens' values zeroed before sampling and kept out of the text's attention and of the
        proposals), so the predictions equal the unpadded ones to float rounding.
        """
        if sizes == self.sizes:
            return self
        pads = [(0, w - src.shape[3], 0, h - src.shape[2]) for (h, w), src in zip(sizes, self.srcs, strict=True)]
        if min(min(pad) for pad in pads) < 0:
            raise ValueError(f"cannot pad levels of sizes {self.sizes} down to {sizes}")
        return DinoTextInputs(
            srcs=tuple(F.pad(src, pad) for src, pad in zip(self.srcs, pads, strict=True)),
            masks=tuple(F.pad(mask, pad, value=True) for mask, pad in zip(self.masks, pads, strict=True)),
            poss=tuple(F.pad(pos, pad) for pos, pad in zip(self.poss, pads, strict=True)),
            input_ids=self.input_ids, token_type_ids=self.token_type_ids, text_token_mask=self.text_token_mask,
            text_self_attention_masks=self.text_self_attention_masks, position_ids=self.position_ids)


class DinoTextGraph(nn.Module):
    """``forward(*DinoTextInputs.flat())`` -> (logits 1 x Q x T, boxes 1 x Q x 4).

    logits: the last decoder layer's token logits (-inf on padding tokens; ContrastiveEmbed's further
    padding to 256 columns is left to the caller: it would make T == 256 a special case for export);
    boxes: normalised cxcywh. Shares the model's parameters (no copy); the model must have had
    ``dino_fast.use_fast_inference`` (its deformable attention reads ``LevelShapes``).
    ``core``: how the deformable attention samples (``dino_fast.DeformableCore``): "gather" is torch's
    fastest; "fused" (one custom node, ``openvino_ops``) and "grid_sample" export to OpenVINO at any
    size. ``fused_softmax``: the fusion layers' softmaxes as one custom node too
    (``fusion_attention.fusion_softmax``; ``openvino_ops.vector_kernels`` says where).
    ``text_side_fusion`` (default): the fusion layers' attention as
    ``fusion_attention.text_image_attention`` (its image-side projections moved onto the text: same
    products, a third of the encoder's matmul work less); False runs groundingdino's module (bench/
    compares the two). Raises ValueError for a model this does not cover (single-stage, not 4 levels).
    """

    model: GroundingDINO

    def __init__(self, model: GroundingDINO, core: DeformableCore = "gather", text_side_fusion: bool = True,
                 fused_softmax: bool = False) -> None:
        super().__init__()
        transformer = model.transformer
        if transformer.two_stage_type != "standard" or int(model.num_feature_levels) != LEVELS:
            raise ValueError(f"only two-stage Grounding DINO with {LEVELS} levels is covered, got "
                             f"{transformer.two_stage_type} with {model.num_feature_levels}")
        self.model = model
        self.core = core
        self.text_side_fusion = text_side_fusion
        self.fused_softmax = fused_softmax

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        srcs, masks, poss = flat[:LEVELS], flat[LEVELS:2 * LEVELS], flat[2 * LEVELS:3 * LEVELS]
        input_ids, token_type_ids, text_token_mask, self_attention_masks, position_ids = flat[3 * LEVELS:]
        model: Any = self.model  # groundingdino's modules are untyped
        if model.sub_sentence_present:
            bert_inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids,
                           "attention_mask": self_attention_masks, "position_ids": position_ids}
        else:
            bert_inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids,
                           "attention_mask": text_token_mask.long()}
        encoded_text = model.feat_map(model.bert(**bert_inputs)["last_hidden_state"])
        text_dict = {"encoded_text": encoded_text, "text_token_mask": text_token_mask,
                     "position_ids": position_ids, "text_self_attention_masks": self_attention_masks}
        hidden, reference, memory_text = _transformer(model.transformer, srcs, masks, poss, text_dict,
                                                      self.core, self.text_side_fusion, self.fused_softmax)
        # Only the last decoder layer's outputs are used (as in the model's own output dict).
        boxes = (model.bbox_embed[-1](hidden) + _inverse_sigmoid(reference)).sigmoid()
        return _token_logits(hidden, memory_text, text_token_mask), boxes


def _token_logits(x: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor) -> torch.Tensor:
    """ContrastiveEmbed (parameter-free) without its padding to 256 columns: bs x N x T."""
    return (x @ text.transpose(-1, -2)).masked_fill(~text_token_mask[:, None, :], float("-inf"))


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """groundingdino.util.misc.inverse_sigmoid."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Transformer.get_valid_ratio: the unpadded share of a level's width and height (bs x 2)."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def _grid(h: int, w: int, offset: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """meshgrid(linspace(o, h - 1 + o, h), linspace(o, w - 1 + o, w)): rows (y) and columns (x), h x w."""
    ys = torch.arange(h, dtype=torch.float32, device=device) + offset
    xs = torch.arange(w, dtype=torch.float32, device=device) + offset
    return ys[:, None].expand(h, w), xs[None, :].expand(h, w)


def _reference_points(sizes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """TransformerEncoder.get_reference_points from the levels' (symbolic) sizes."""
    refs = []
    for level, (h, w) in enumerate(sizes):
        ref_y, ref_x = _grid(h, w, 0.5, valid_ratios.device)
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def _proposals(memory: torch.Tensor, padding: torch.Tensor,
               sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """groundingdino's gen_encoder_output_proposals (learnedwh None) from the levels' (symbolic) sizes.

    A proposal is kept when its centre (i + 0.5) / n lies strictly inside (0.01, 0.99). That is decided
    here in integers, 50 (2i + 1) against n and 99 n: centres land exactly on 0.99 (49.5 / 50), where
    torch's float32 division says "not below" and OpenVINO's fused division (a reciprocal multiply)
    says 0.98999995, which moved 74 proposals in and reordered the queries at 800 px. For n below
    ~10^5 the float32 test and the exact one agree, so this is groundingdino's decision.
    """
    n = memory.shape[0]
    proposals, kept = [], []
    start = 0
    for level, (h, w) in enumerate(sizes):
        level_mask = padding[:, start:start + h * w].view(n, h, w, 1)
        valid_h = torch.sum(~level_mask[:, :, 0, 0], 1)
        valid_w = torch.sum(~level_mask[:, 0, :, 0], 1)
        grid_y, grid_x = _grid(h, w, 0.0, memory.device)
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        size = 0.05 * (2.0 ** level)
        wh = torch.ones_like(grid) * size
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        centre_x = 50 * (2 * torch.arange(w, device=memory.device) + 1)  # 100 * (i + 0.5)
        centre_y = 50 * (2 * torch.arange(h, device=memory.device) + 1)
        inside_x = (centre_x > valid_w[:, None]) & (centre_x < 99 * valid_w[:, None])  # n x w
        inside_y = (centre_y > valid_h[:, None]) & (centre_y < 99 * valid_h[:, None])  # n x h
        inside = (inside_y[:, :, None] & inside_x[:, None, :]) & (0.01 < size < 0.99)
        kept.append(inside.reshape(n, -1, 1))
        start += h * w
    output_proposals = torch.cat(proposals, 1)
    valid = torch.cat(kept, 1)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(padding.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(padding.unsqueeze(-1), float(0)).masked_fill(~valid, float(0))
    return output_memory, output_proposals


def _transformer(transformer: Any, srcs: tuple[torch.Tensor, ...], masks: tuple[torch.Tensor, ...],
                 poss: tuple[torch.Tensor, ...],
                 text_dict: dict[str, torch.Tensor],
                 core: DeformableCore, text_side_fusion: bool,
                 fused_softmax: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transformer.forward at inference (two-stage, no denoising queries): the last decoder layer's
    normed hidden state (bs x Q x d), the reference boxes it refined (bs x Q x 4, sigmoid) and the
    text as the encoder left it (bs x T x d: what the heads compare the queries with)."""
    sizes = [(src.shape[2], src.shape[3]) for src in srcs]
    src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
    mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
    pos_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + transformer.level_embed[level].view(1, 1, -1)
                             for level, pos in enumerate(poss)], 1)
    one = torch.ones((), dtype=torch.long, device=src_flatten.device)
    spatial_shapes = LevelShapes(tuple(sizes), torch.stack([torch.stack([one * h, one * w]) for h, w in sizes]),
                                 core)
    valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1)
    memory, memory_text = _encoder(transformer.encoder, src_flatten, pos_flatten, sizes, spatial_shapes,
                                   valid_ratios, mask_flatten, text_dict, text_side_fusion, fused_softmax)
    text_dict = {**text_dict, "encoded_text": memory_text}

    output_memory, output_proposals = _proposals(memory, mask_flatten, sizes)
    output_memory = transformer.enc_output_norm(transformer.enc_output(output_memory))
    enc_class = _token_logits(output_memory, memory_text, text_dict["text_token_mask"])
    topk = torch.topk(enc_class.max(-1)[0], transformer.num_queries, dim=1)[1]
    # The box head on the selected tokens only (groundingdino runs it on every token, then gathers).
    selected = torch.gather(output_memory, 1, topk.unsqueeze(-1).repeat(1, 1, transformer.d_model))
    refpoints = (transformer.enc_out_bbox_embed(selected)
                 + torch.gather(output_proposals, 1, topk.unsqueeze(-1).repeat(1, 1, 4)))
    if transformer.embed_init_tgt:
        bs = src_flatten.shape[0]
        tgt = transformer.tgt_embed.weight[:, None, :].repeat(1, bs, 1).transpose(0, 1)
    else:
        tgt = selected
    hidden, reference = _decoder(transformer.decoder, tgt.transpose(0, 1), memory.transpose(0, 1), mask_flatten,
                                 pos_flatten.transpose(0, 1), refpoints.transpose(0, 1), spatial_shapes,
                                 valid_ratios, text_dict)
    return hidden, reference, memory_text


def _encoder(encoder: Any, src: torch.Tensor, pos: torch.Tensor, sizes: list[tuple[int, int]],
             spatial_shapes: LevelShapes, valid_ratios: torch.Tensor, key_padding_mask: torch.Tensor,
             text_dict: dict[str, torch.Tensor], text_side_fusion: bool,
             fused_softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerEncoder.forward (no checkpointing): fusion, text and deformable layers in turn."""
    from groundingdino.models.GroundingDINO.utils import get_sine_pos_embed

    output, memory_text = src, text_dict["encoded_text"]
    text_attention_mask = ~text_dict["text_token_mask"]
    reference_points = _reference_points(sizes, valid_ratios)
    pos_text = get_sine_pos_embed(text_dict["position_ids"][..., None], num_pos_feats=256, exchange_xy=False)
    for layer_id, layer in enumerate(encoder.layers):
        if encoder.fusion_layers and text_side_fusion:
            output, memory_text = fusion_layer(encoder.fusion_layers[layer_id], output, memory_text,
                                               key_padding_mask, text_attention_mask,
                                               fused=fused_softmax)
        elif encoder.fusion_layers:
            output, memory_text = encoder.fusion_layers[layer_id](
                v=output, l=memory_text, attention_mask_v=key_padding_mask, attention_mask_l=text_attention_mask)
        if encoder.text_layers:
            memory_text = encoder.text_layers[layer_id](
                src=memory_text.transpose(0, 1), src_mask=~text_dict["text_self_attention_masks"],
                src_key_padding_mask=text_attention_mask, pos=pos_text.transpose(0, 1)).transpose(0, 1)
        output = layer(src=output, pos=pos, reference_points=reference_points, spatial_shapes=spatial_shapes,
                       level_start_index=None, key_padding_mask=key_padding_mask)
    return output, memory_text



def _decoder(decoder: Any, tgt: torch.Tensor, memory: torch.Tensor, memory_key_padding_mask: torch.Tensor,
             pos: torch.Tensor, refpoints_unsigmoid: torch.Tensor, spatial_shapes: LevelShapes,
             valid_ratios: torch.Tensor, text_dict: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerDecoder.forward, keeping only what the heads read: the last layer's normed output and
    the reference boxes that layer started from (both bs x Q x ...)."""
    from groundingdino.models.GroundingDINO.utils import gen_sineembed_for_position

    output = tgt
    reference_points = refpoints_unsigmoid.sigmoid()
    ratios = torch.cat([valid_ratios, valid_ratios], -1)[None, :]
    last = len(decoder.layers) - 1
    for layer_id, layer in enumerate(decoder.layers):
        reference_points_input = reference_points[:, :, None] * ratios  # nq, bs, nlevel, 4
        # groundingdino embeds the reference scaled by level 0's valid ratio: 1 for the unpadded image
        # it is given (x * 1.0 == x), not 1 where DinoTextInputs.padded pads; the unscaled reference
        # keeps the padded features' predictions those of the image.
        query_sine_embed = gen_sineembed_for_position(reference_points)
        raw_query_pos = decoder.ref_point_head(query_sine_embed)
        pos_scale = decoder.query_scale(output) if decoder.query_scale is not None else 1
        output = layer(
            tgt=output, tgt_query_pos=pos_scale * raw_query_pos, tgt_query_sine_embed=query_sine_embed,
            tgt_key_padding_mask=None, tgt_reference_points=reference_points_input,
            memory_text=text_dict["encoded_text"], text_attention_mask=~text_dict["text_token_mask"],
            memory=memory, memory_key_padding_mask=memory_key_padding_mask, memory_level_start_index=None,
            memory_spatial_shapes=spatial_shapes, memory_pos=pos, self_attn_mask=None, cross_attn_mask=None)
        if layer_id == last:
            break
        new_reference = (decoder.bbox_embed[layer_id](output) + _inverse_sigmoid(reference_points)).sigmoid()
        reference_points = new_reference.detach()
    return decoder.norm(output).transpose(0, 1), reference_points.transpose(0, 1)
