"""The generated API page is in sync with the code, and covers every public name."""

import importlib
import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_api_page_is_up_to_date() -> None:
    generator = runpy.run_path(str(DOCS / "gen_api.py"))
    assert (DOCS / "api.md").read_text(encoding="utf-8") == generator["render"](), (
        "docs/api.md is stale: run `python docs/gen_api.py`"
    )


def test_api_page_documents_every_exported_name() -> None:
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    for module_name in ("lowrank", "lowrank.decompose", "lowrank.kernels", "lowrank.io",
                        "lowrank.nn"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name in ("decompose", "io"):  # subpackages, documented by their own sections
                continue
            assert f".{name}`" in page, f"{module_name}.{name} is missing from docs/api.md"
