"""CONTRIBUTING.md's three recipes, each followed with throwaway parts registered by a plugin in a child pytest
run (tests/recipes/recipe_plugin.py): the invariant suite must collect and pass them without any other edit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# recipe -> (the -k expression of the invariant tests it runs, ids that must be among them); the new adapter case
# runs with three methods (attention-based, merging, inside the LLM)
RECIPES = {
    "method": ("keep_first", ["test_retain_one_is_lossless[keep_first-llava]",
                              "test_padded_batch_equals_singles[keep_first-whisper]"]),
    "signal": ("brightest", ["test_llm_sees_exact_budget[budget0-brightest-llava]"]),
    "adapter": ("variant and (visionzip or tome or fastv)", ["test_retain_one_is_lossless[visionzip-variant]",
                                                             "test_model_restored_after_exit_and_exception[fastv-variant]"]),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_invariant_suite_picks_up_a_recipe(recipe):
    key, must = RECIPES[recipe]
    env = {**os.environ, "TOKENZIP_RECIPE": recipe,
           "PYTHONPATH": os.pathsep.join([str(TESTS / "recipes"), os.environ.get("PYTHONPATH", "")])}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-p", "recipe_plugin", "-p", "no:cacheprovider", "-v", "-x",
                          str(TESTS / "test_invariants.py"), "-k", key], capture_output=True, text=True, env=env,
                         cwd=TESTS.parent, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    passed = {line.split("::")[1].split(" ")[0] for line in ran.stdout.splitlines() if line.endswith("PASSED") or
              " PASSED " in line}
    for test_id in must:
        assert test_id in passed, f"{test_id} did not run and pass"
    assert len(passed) >= 7, f"only {len(passed)} invariant tests ran"
