"""Local VQA task files: loader, prompts, scorers, and an end-to-end run on a tiny task with the tiny model."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

import tokenzip as tz
from tokenzip.bench import build
from tokenzip.bench.tasks import (
    PROMPTS,
    Record,
    answer_letter,
    evaluate,
    exact_match,
    load_task,
    normalize,
    predicted_letter,
    prompt_for,
    run_task_sweep,
    score,
)


@pytest.fixture
def task_dir(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    recs = [
        {"image": "img0.png", "question": "What is the color of the image?", "answer": "Red", "benchmark": "gqa"},
        {"image": "img1.png", "question": "What is in the image?", "choices": ["cat", "dog", "car"],
         "answer": "B", "benchmark": "mmbench", "id": "q2"},
        {"image": "img0.png", "question": "Is it red?", "choices": ["yes", "no"], "answer": "no"},
    ]
    with open(tmp_path / "task.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return tmp_path, recs


def test_loader_jsonl_and_parquet(task_dir):
    root, recs = task_dir
    a = load_task(str(root / "task.jsonl"))
    assert [r.benchmark for r in a] == ["gqa", "mmbench", "default"]
    assert a[0].image == str(root / "img0.png") and a[1].choices == ["cat", "dog", "car"] and a[1].id == "q2"
    assert not a[0].is_mc and a[1].is_mc
    if importlib.util.find_spec("pyarrow") is None:  # the bench extra
        hint = 'pyarrow is not installed: pip install "tokenzip[bench]"'
        if os.environ.get("CI") == "true":
            pytest.fail(f"{hint} (CI=true: the Parquet loader must be tested)")
        pytest.skip(hint)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "choices": r.get("choices", []), "benchmark": r.get("benchmark"),
                                   "id": r.get("id")} for r in recs])
    pq.write_table(table, root / "task.parquet")
    b = load_task(str(root / "task.parquet"))
    assert [(r.question, r.answer, r.choices, r.image) for r in a] == [(r.question, r.answer, r.choices, r.image)
                                                                       for r in b]
    assert len(load_task(str(root / "task.jsonl"), limit=2)) == 2


def test_loader_rejects_bad_files(tmp_path, task_dir):
    root, _ = task_dir
    with pytest.raises(ValueError, match="does not exist"):
        load_task(str(root / "nope.jsonl"))
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="missing.png"):
        load_task(str(bad))
    bad.write_text(json.dumps({"image": "img0.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        load_task(str(bad))
    bad.write_text(json.dumps({"image": "img0.png", "question": "q", "answer": "a", "benchmark": "nope"}) + "\n")
    with pytest.raises(ValueError, match="benchmark"):
        load_task(str(bad))
    with pytest.raises(ValueError, match="jsonl or .parquet"):
        (root / "t.csv").write_text("x")
        load_task(str(root / "t.csv"))


def test_prompts_per_benchmark():
    gqa = Record("What is it?", "cat", benchmark="gqa")
    assert prompt_for(gqa) == "What is it?\nAnswer the question using a single word or phrase."
    mmb = Record("Which one?", "B", choices=["cat", "dog"], benchmark="mmbench")
    assert prompt_for(mmb) == ("Which one?\nA. cat\nB. dog\n"
                               "Answer with the option's letter from the given choices directly.")
    assert PROMPTS["gqa"] == "Answer the question using a single word or phrase."


def test_scorers():
    assert normalize("  The Two Cats! ") == "2 cats"
    assert exact_match("two", "2") and exact_match("A red car.", "red car") and not exact_match("red", "blue")
    choices = ["cat", "dog", "car"]
    assert answer_letter("B", choices) == "B" and answer_letter("(c)", choices) == "C"
    assert answer_letter("dog", choices) == "B" and answer_letter("Z", choices) is None
    assert predicted_letter("B", choices) == "B"
    assert predicted_letter("B. dog", choices) == "B"
    assert predicted_letter("(A)", choices) == "A"
    assert predicted_letter("The answer is C", choices) == "C"
    assert predicted_letter("dog", choices) == "B"
    assert predicted_letter("D", choices) is None and predicted_letter("maybe", choices) is None
    recs = [Record("q", "red"), Record("q", "B", choices=choices), Record("q", "cat", choices=choices)]
    s = score(recs, ["Red.", "A", "a"])
    assert s["n"] == 3 and s["n_mc"] == 2
    assert s["mc_accuracy"] == pytest.approx(0.5) and s["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"):
        score(recs, ["x"])


def test_end_to_end_tiny_task(task_dir):
    root, _ = task_dir
    built = build("tiny")
    records = load_task(str(root / "task.jsonl"))
    base = evaluate(built.model, built.processor, records, new_tokens=3)
    assert base["n"] == 3 and len(base["predictions"]) == 3
    assert all(isinstance(p, str) for p in base["predictions"])
    assert 0.0 <= base["exact_match"] <= 1.0 and 0.0 <= base["mc_accuracy"] <= 1.0
    # retain=1.0 is lossless, so predictions match the uncompressed model exactly
    same = evaluate(built.model, built.processor, records, compressor=tz.get("random", retain=1.0), new_tokens=3)
    assert same["predictions"] == base["predictions"]
    rows = run_task_sweep(built, str(root / "task.jsonl"), [("random", tz.method_class("random"))], [0.25],
                          new_tokens=3)
    assert [(r["method"], r["retain"]) for r in rows] == [("none", 1.0), ("random", 0.25)]
    assert rows[0]["predictions"] == base["predictions"]
    assert all(r["n"] == 3 for r in rows)
