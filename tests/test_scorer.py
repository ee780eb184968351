"""The score-then-keep base (tokenzip.scorer): subclasses only score, the base keeps the stable top k in order."""

from dataclasses import dataclass
from typing import ClassVar

import torch

import tokenzip as tz
from tokenzip.base import MethodInfo
from tokenzip.llm.base import LLMScorer
from tokenzip.scorer import ScorerCompressor

torch.set_num_threads(1)


@dataclass
class Given(ScorerCompressor):
    """Keeps the tokens with the highest given scores (test double)."""

    scores: torch.Tensor | None = None
    info: ClassVar[MethodInfo] = MethodInfo(name="given", family="attention", modalities=("image",),
                                            stage="pre_llm", query_aware=False, reference="test, arXiv:0000.00000")

    def score_tokens(self, tokens, layout, signals):
        return self.scores


def test_base_keeps_the_top_k_in_position_order_ties_to_the_lower_index():
    tokens = torch.arange(2 * 6 * 2, dtype=torch.float).reshape(2, 6, 2)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0, 0.5],
                           [3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    out = Given(tokens=3, scores=scores).compress(tokens)
    # row 0: 0.9 (1, 3), then the tie at 0.5 goes to 2 (before 5); row 1: 3.0 (0), then 2.0 at 2 and 3 (not 4)
    assert out.index.tolist() == [[1, 2, 3], [0, 2, 3]]
    assert torch.equal(out.tokens[0], tokens[0, [1, 2, 3]]) and torch.equal(out.tokens[1], tokens[1, [0, 2, 3]])
    assert out.source.tolist() == [[-1, 0, 1, 2, -1, -1], [0, -1, 1, 2, -1, -1]]


def test_the_score_then_keep_methods_use_the_base():
    scorers = {m.info.name for m in tz.METHODS if issubclass(m, ScorerCompressor)}
    assert scorers == {"random", "cls_topk", "attn_topk", "fastv", "fastv_av", "pyramiddrop", "zipvl", "st3",
                       "fitprune"}
    assert all(issubclass(m, LLMScorer) for m in tz.METHODS if m.info.name in scorers and m.info.stage == "llm")


def test_segmentwise_keep_gives_each_segment_its_share():
    # 12 tokens, 3 segments of 4: the global top 4 all lie in the first segment, segmentwise keeps 2 + 1 + 1
    attn = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]])
    tokens = torch.randn(1, 12, 3)
    assert tz.get("attn_topk", tokens=4).compress(tokens, cls_attention=attn).index.tolist() == [[0, 1, 2, 3]]
    seg = tz.get("attn_topk", tokens=4, segments=3).compress(tokens, cls_attention=attn)
    assert seg.index.tolist() == [[0, 1, 5, 8]]
