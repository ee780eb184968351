"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, LLaVA-1.6): CLIP tower with a [CLS] token (features from
``vision_feature_layer``, -2 in the released configs, [CLS] dropped by the "default" select strategy), 2-layer MLP
projector, AnyRes tiling, one run of ``image_token_id`` placeholders per image.

The image path is adapters/anyres.py, shared with LLaVA-OneVision; what differs is said here.

What is compressed. The packed LLM-space features, exactly as the stock model feeds them to the LLM: the output of
``model.model.get_image_features`` — the projector on every crop's patch tokens, then ``pack_image_features``: the
base view (the whole image at the tower's size, ``side x side`` tokens: 24 x 24 = 576 at 336 px / 14 px patches),
then the AnyRes crop grid of the best-fitting ``image_grid_pinpoints`` resolution, unpadded to the image's aspect
ratio, with one ``image_newline`` token closing each row of the grid (about 2.9k tokens for a 672 x 672 image). Unlike
OneVision, NeXT tiles every image (also in samples with several images: there is no ``batch_num_images``) and never
down-scales a large grid (no ``vision_aspect_ratio``). An image's budget ``N`` is all of its tokens, newline markers
included; a method may drop, keep or merge a marker like any other token.

Layout handed to the method: ``[(h, w), (H, W + 1)]`` — the base view's grid, then the unpadded crop grid whose last
column holds the newline markers (``Item.extra["newline"]`` masks them). NeXT always has at least one AnyRes crop
(``image_size_to_num_patches`` >= 2); the base view alone (``[(h, w), (1, 1)]``: one trailing newline) exists only
after the input stage's ``crops`` reduction below.

Signals. ``cls_attention`` is the [CLS] token's attention over each crop's patches (mean over heads) at the vision
feature layer, recomputed from that layer's own q/k (adapters/probe.py; the tower keeps SDPA); ``keys`` are that
layer's keys (mean over heads). Both are per crop, so they are arranged like the features by the model's own
``pack_image_features`` with a zero vector as the newline: markers get ``cls_attention`` 0 and zero keys. Each crop's
[CLS] row is a softmax over that crop, so values compare within a crop, not across crops (a crop of plain background
still has a row that sums to 1). ``projected`` is the tokens themselves (already in LLM space); ``text`` /
``text_mask`` the prompt's text embeddings.

Rebuild. Each image keeps its first ``k`` placeholders (the prompt shortened, ``attention_mask``/``labels``/...
with it) and the compressed features go to the stock model as ``mm_encoder_outputs["image"]`` (a tuple of per-image
tensors, which the model concatenates and scatters); ``retain=1`` gives the model exactly its own features.

Stage "llm": each image's placeholder run, planned without the tower (the model's packing of a dummy tensor), with the
layout above; after a pre-LLM method, the kept counts.

Stage "input", reduction ``"crops"`` (adapters/resample.py): an image whose budget is under its tiled count gets its
base view alone — its ``side x side`` tokens and one trailing ``image_newline``, what ``pack_image_features`` makes of
a one-crop image — from the base crop's pixels (the other crops are never encoded); the base-view tokens are the
original ones exactly (the tower encodes each crop on its own).

Stage "encoder" (``tz.InEncoder(method, layer=L)`` or a schedule). Every crop of every image is one row of the CLIP
tower, as in the model; embedding, pre-norm and layers ``0 .. L-1`` run on all of them unchanged. At the cut an image's
candidates are its crops' patch tokens that the packing keeps (the unpadded ones), in packed order, with layout
``[(h, w), (H, W)]`` (no newline column: markers do not exist inside the tower). Each crop's [CLS] token is not a
candidate: it stays in its crop's row, with size 1, as in LLaVA-1.5's encoder stage (ViT layers use it as an
attention hub), and is dropped at the feature layer as the "default" strategy does. After the cut each kept/merged
token belongs to the crop of its first source; the remaining layers up to ``vision_feature_layer`` run per crop row
([CLS] + its tokens), rows padded to the longest with one additive mask (``log(size)``: ToMe's proportional attention,
arXiv:2210.09461; the dtype's minimum on padding). Signals at the cut: the [CLS] attention / keys of layer ``L-1`` per
crop. Budget and the ``k >= candidates`` case (the image kept whole, the model's own packing, markers past ``k``
dropped: identical logits at ``retain=1``) are as for LLaVA-OneVision (adapters/llava_onevision.py). Supported for
one integer ``vision_feature_layer`` with the "default" strategy on a tower with a [CLS] token (the released configs).
"""

from __future__ import annotations

from .anyres import AnyResImages


class LlavaNextAdapter(AnyResImages):
    """See the module docstring; the image path (all four stages) is adapters/anyres.py."""

    family = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration",)
    modalities = ("image",)
