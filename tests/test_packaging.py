"""The built wheel holds every subpackage: a fresh install (no editable path) imports the CLI,
the file formats, the modules and the kernels."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source_packages() -> set[str]:
    found = {"lowrank.kernels"}
    for init in (ROOT / "lowrank").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_the_wheel_holds_every_package_and_its_cli_imports(tmp_path):
    source = tmp_path / "source"  # the sources alone: no build/ left by an earlier build
    for name in ("lowrank", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("lowrank_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        inside = {".".join(Path(n).parent.parts) for n in archive.namelist()
                  if n.endswith("__init__.py")}  # fmt: skip
    assert _source_packages() <= inside
    probe = ("import lowrank.cli, lowrank.io, lowrank.io.formats, lowrank.nn, lowrank.kernels; "
             "print(lowrank.__file__)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"),
                                             "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(tmp_path / "site") in done.stdout
