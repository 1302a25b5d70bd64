"""The package layout's rules (issue 13): dependencies run stages -> pipeline -> models, never back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_models_import_neither_pipeline_nor_ray() -> None:
    # A fresh interpreter: this test process has long imported both.
    modules = sorted(p.stem for p in (ROOT / "models").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module('models.' + m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('pipeline', 'ray', 'stages'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert len(modules) >= 10
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_models_source_names_pipeline_in_an_import() -> None:
    offenders = [f"{p.name}:{i}" for p in (ROOT / "models").glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import pipeline", "from pipeline", "import stages", "from stages"))]
    assert offenders == []


def test_modules_stay_small_and_stages_thin() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in ("pipeline", "models", "stages") for p in (ROOT / folder).rglob("*.py")}
    assert len(sizes) > 60
    assert {f: n for f, n in sizes.items() if n > 400} == {}
    assert {f: n for f, n in sizes.items() if f.startswith("stages/") and n > 100} == {}
