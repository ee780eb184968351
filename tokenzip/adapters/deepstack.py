"""DeepStack inside the LLM (stage "llm"), shared by the adapters of the models that have it: Qwen3-VL
(:mod:`tokenzip.adapters.qwen3_vl`) and Qwen3-Omni (:mod:`tokenzip.adapters.qwen3_omni`).

The model. The vision tower gives, next to each visual token, one more row per DeepStack level; the text model adds
level ``i``'s rows to the hidden states at the visual positions (``visual_pos_masks [B, L]``, rows in the mask's
row-major order) after decoder layer ``i``, in its own ``_deepstack_process(hidden, visual_pos_masks,
visual_embeds)``.

Inside the LLM. Once an LLM-stage method has dropped (or merged) tokens at layer ``K``, the layers from ``K`` on run
on the kept slots only, so a level added after one of them must go only to the visual tokens still present, each the
row of the position it sits at (a token merged inside the LLM: its representative's, whose slot it holds).
:class:`DeepstackFollower` does exactly that: while the runner is installed it stands in for the text model's
``_deepstack_process`` (an instance attribute: the class method is untouched) and, when the runner reports that the
sequence was shortened (``runner.current_positions()``: the original position each slot holds, ``-1`` at filler
slots), narrows ``visual_pos_masks`` to the present slots and picks their rows; on the full sequence it is the
model's own step. This is the stock model with the removed tokens hidden as keys from layer ``K`` on (the LLM
stage's reference semantics, tests/test_llm_stage.py): every surviving position receives its own rows.
"""

from __future__ import annotations

from typing import Any

import torch


class DeepstackFollower:
    """The text model's ``_deepstack_process`` following the LLM-stage runner's shortened sequence (module doc);
    ``remove()`` restores the model's own."""

    def __init__(self, text_model: torch.nn.Module, runner: Any):
        if not callable(getattr(text_model, "_deepstack_process", None)):
            raise TypeError(f"{type(text_model).__name__} has no _deepstack_process: not a DeepStack text model")
        self.text_model, self.runner = text_model, runner
        self.original = text_model._deepstack_process
        text_model._deepstack_process = self

    def __call__(self, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        pos = self.runner.current_positions()
        if pos is None:  # full length: the model's own step
            return self.original(hidden, visual_pos_masks, visual_embeds)
        mask = visual_pos_masks.to(pos.device)
        row_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # each visual position's row in the level
        safe = pos.clamp(min=0)
        present = (pos >= 0) & torch.gather(mask, 1, safe)
        rows = torch.gather(row_of, 1, safe)[present]
        return self.original(hidden, present, visual_embeds[rows.to(visual_embeds.device)])

    def remove(self) -> None:
        self.text_model.__dict__.pop("_deepstack_process", None)
