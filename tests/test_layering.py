"""The package's plain model and math code imports without Lightning or Hydra: every module under
`easygen/` except the Lightning layer (`easygen.lit`) and the stage programs (`easygen.stages`) is imported
in a fresh interpreter in which importing either raises."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

BLOCK = '''
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric", "hydra"):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
import easygen
names = sorted(m.name for m in pkgutil.walk_packages(easygen.__path__, "easygen.")
               if not m.name.startswith(("easygen.lit", "easygen.stages", "easygen.serve")))
for name in names:
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] in ("lightning", "hydra")]
print(len(names))
'''


def test_plain_code_imports_without_lightning_or_hydra():
    r = subprocess.run([sys.executable, "-c", BLOCK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) >= 20  # the modules walked: the test saw the package


def test_the_blocker_blocks():
    """The same interpreter set-up fails on a module that imports Lightning first."""
    r = subprocess.run([sys.executable, "-c", BLOCK.replace("import easygen\n", "import easygen\nimport easygen.lit.bidiffuser_module\n")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "blocked: lightning" in r.stderr, r.stderr[-2000:]
