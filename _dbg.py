import torch, tokenzip as tz
from tokenzip.testing import CASES, default_samples
m = CASES["internvl_video"].build("sdpa")
inp = CASES["internvl_video"].make_inputs(m, default_samples())
c = tz.InEncoder(tz.get("tome", retain=0.3), layer=(1, 2))
with c(m):
    m(**inp)
print([(it.tokens_in, it.tokens_out) for s in c.last_stats for ms in s.values() for it in ms.items])
print([tz.get("tome", retain=0.3).budget.count(n) for n in (64, 80, 48)])
