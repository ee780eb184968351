"""The LLM-stage reference for hybrid decoders (Qwen3.5: linear-attention layers interleaved with full attention),
written here from scratch.

Masks cannot hide a token from a linear-attention layer (its convolution and recurrent state would still step over
the hidden slot), so the reference REMOVES the tokens: it runs the stock decoder layers by hand on one unpadded
sample, the layers before a stage on the full sequence and the later ones on the kept hidden states only (merged
groups become their mean at the representative's position), with the positions the uncompressed model gives those
tokens, a plain causal mask for the full-attention layers and no mask for the linear ones. Greedy decoding is
recomputed without cache over [kept prompt + generated tokens].
"""

import torch


def prompt_call(model, inputs, position_ids):
    """The language model's ``inputs_embeds`` and 4-row ``position_ids`` of a stock forward of ``inputs``."""
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=position_ids)
    finally:
        hook.remove()
    return seen["inputs_embeds"], seen["position_ids"]


def run_layers(model, kinds, embeds, positions, plan):
    """Logits ``[1, W, V]`` at the kept positions and the kept positions, for one unpadded sequence.

    ``embeds`` ``[1, L, D]``, ``positions`` ``[4, 1, L]`` (row 0 text, rows 1-3 M-RoPE), ``plan``: ``{layer: [groups
    of positions]}`` (each group becomes one token at its first member; positions in no group of a stage's items
    are dropped at that stage, the others stay)."""
    lm = model.model.language_model
    h = embeds
    keep = list(range(embeds.shape[1]))
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in plan:
                dropped = set()
                h = h.clone()
                for groups, removed in plan[i]:
                    for g in groups:
                        idx = [keep.index(p) for p in g]
                        h[0, idx[0]] = h[0, idx].mean(0)
                    dropped |= set(removed)
                slots = [s for s, p in enumerate(keep) if p not in dropped]
                h = h[:, slots]
                keep = [keep[s] for s in slots]
            pos = positions[:, :, keep]
            pe = lm.rotary_emb(h, pos[1:])
            w = len(keep)
            if kinds[i] == "full_attention":
                mask = torch.full((1, 1, w, w), torch.finfo(h.dtype).min).triu(1)
            else:
                mask = None
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos[0])
        return model.lm_head(lm.norm(h)), keep


def greedy(model, kinds, embeds, positions, plan, steps):
    """``steps`` greedy tokens and the last-position logits that chose each, each step recomputed without cache
    over [kept prompt + generated tokens] with the kept set fixed (generated tokens always stay); generated tokens
    continue the positions at ``max + 1`` (every M-RoPE row), as ``rope_deltas`` makes the model continue.
    Suppressed ids (the generation config's) are never chosen."""
    suppress = list(model.generation_config.suppress_tokens or [])
    embed = model.get_input_embeddings()
    out, scores = [], []
    top = int(positions[1:].max())
    length = positions.shape[-1]
    for j in range(steps):
        logits, _ = run_layers(model, kinds, embeds, positions, plan)
        last = logits[0, -1].clone()
        scores.append(logits[0, -1])
        if suppress:
            last[suppress] = float("-inf")
        token = int(last.argmax())
        out.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
        new = torch.tensor([length + j] + [top + 1 + j] * 3).view(4, 1, 1)
        positions = torch.cat([positions, new.to(positions.dtype)], dim=-1)
    return out, scores
