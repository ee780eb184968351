"""One patched model used from several threads at once, and many times over (issue 21): every call gets the result
it gets alone, installing or removing the patch meanwhile is a clear error, and 500 calls leave memory and hooks
flat."""

import gc
import os
import resource
import sys
import threading

import pytest
import torch

import tokenzip as tz
from tokenzip.adapters import adapter_for
from tokenzip.testing import CASES, Sample

from conftest import built


def _samples(call: int) -> list[Sample]:
    """A different batch for every call: 1 to 3 samples, prompts of different lengths, 1 or 2 media items each."""
    out = []
    for j in range(1 + call % 3):
        s = 7 * call + j
        out.append(Sample([1] + [5 + (s + i) % 40 for i in range(1 + s % 5)], 1 + (s % 4 == 0),
                          [9 + (s + i) % 30 for i in range(1 + (s * 3) % 4)], seed=s + 1))
    return out


def _run(model, compressor, case: str, call: int) -> tuple[torch.Tensor, list]:
    inputs = CASES[case].make_inputs(model, _samples(call))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    stats = [[(it.tokens_in, it.tokens_out, it.source.tolist()) for ms in s.values() for it in ms.items]
             for s in compressor.last_stats]  # read in the calling thread, right after its call
    return out, stats


def _concurrently(worker, threads: int) -> list:
    """``worker(t)`` in ``threads`` threads started together; their results (the first error is raised)."""
    results: list = [None] * threads
    errors: list = []
    barrier = threading.Barrier(threads)

    def run(t):
        try:
            barrier.wait()
            results[t] = worker(t)
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(e)

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads as finely as the interpreter allows
    try:
        for th in pool:
            th.start()
        for th in pool:
            th.join(300)
    finally:
        sys.setswitchinterval(switch)
    if errors:
        raise errors[0]
    assert not any(th.is_alive() for th in pool)
    return results


# (case, method, options): an image model and video models; before, inside and at the input of the LLM; adapters
# whose calls run at once (LLaVA, LLaVA-OneVision) and one whose calls run one at a time (Qwen2-VL: its model keeps
# rope_deltas between generate()'s steps)
CONFIGS = [
    ("llava", "visionzip", {}),
    ("llava", "fastv", {}),
    ("llava_onevision_video", "framefusion", {}),
    ("llava_onevision_video", "dycoke", {}),
    ("qwen2_vl_video", "uniform_frames", {}),
    ("qwen2_vl_video", "framefusion", {}),
]
THREADS, CALLS = 4, 5


@pytest.mark.filterwarnings("ignore::tokenzip.budget.BudgetFloorWarning")
@pytest.mark.parametrize("case,method,options", CONFIGS, ids=[f"{m}-{c}" for c, m, _ in CONFIGS])
def test_threads_get_the_results_of_sequential_calls(case, method, options):
    model = built(case)
    c = tz.get(method, retain=0.25, **options)
    jobs = [[t * CALLS + i for i in range(CALLS)] for t in range(THREADS)]
    with c(model):
        alone = {call: _run(model, c, case, call) for calls in jobs for call in calls}
        together = _concurrently(lambda t: [(call, _run(model, c, case, call)) for call in jobs[t]], THREADS)
    checked = 0
    for per_thread in together:
        for call, (out, stats) in per_thread:
            ref_out, ref_stats = alone[call]
            assert torch.equal(out, ref_out), f"call {call}: output differs from the same call alone"
            assert stats == ref_stats, f"call {call}: last_stats differ from the same call alone"
            checked += 1
    assert checked == THREADS * CALLS
    assert adapter_for(model).concurrent_calls == (case != "qwen2_vl_video")


def test_install_or_remove_while_calls_are_in_flight_is_an_error():
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, _samples(1))
    started, go = threading.Event(), threading.Event()
    lm = adapter_for(model).parts().language_model

    def hold(module, args, kwargs):
        started.set()
        go.wait(60)

    handle = lm.register_forward_pre_hook(hold, with_kwargs=True)
    patch = tz.get("visionzip", retain=0.25).apply(model)
    worker = threading.Thread(target=lambda: model(**inputs))
    try:
        worker.start()
        assert started.wait(60)
        with pytest.raises(RuntimeError, match=r"1 call\(s\) of the model are in flight"):
            patch.remove()
        with pytest.raises(RuntimeError, match=r"already compressed by tokenzip \(1 call\(s\) of it in flight\)"):
            tz.get("fastv", retain=0.5).apply(model)
    finally:
        go.set()
        worker.join(60)
        handle.remove()
    stale = model.forward
    patch.remove()
    assert getattr(model, "_tokenzip_patch", None) is None and "forward" not in model.__dict__
    with pytest.raises(RuntimeError, match="has been removed"):
        stale(**inputs)


def _rss() -> int:
    """Resident memory of this process in bytes (Linux: /proc; elsewhere the peak, which cannot shrink either)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hook_count(model) -> int:
    return sum(len(getattr(m, kind)) for m in model.modules()
               for kind in ("_forward_hooks", "_forward_pre_hooks"))


def test_500_generate_calls_leave_memory_and_hooks_flat():
    model = built("llava")
    inputs = CASES["llava"].make_inputs(model, _samples(4))
    c = tz.compose(tz.get("visionzip", retain=0.5), tz.get("fastv", retain=0.5))  # before and inside the LLM
    model.generate(**inputs, max_new_tokens=2, do_sample=False)  # transformers installs some hooks of its own lazily
    before = _hook_count(model)
    first = None
    with c(model) as patch:
        for i in range(500):
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            if i == 0:
                first = out
            if i == 99:  # after a warm-up (allocator pools, transformers' lazily installed hooks)
                gc.collect()
                rss, hooks, state = _rss(), _hook_count(model), len(patch.__dict__)
        gc.collect()
        grown = _rss() - rss
        assert _hook_count(model) == hooks
        assert len(patch.__dict__) == state
        assert torch.equal(out, first)
    assert grown < 16 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.1f} MiB over 400 calls"
    assert _hook_count(model) == before  # and none left behind
