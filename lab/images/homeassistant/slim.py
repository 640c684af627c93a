"""Slim the freshly installed venv (runs in the image's build stage, with the venv's python).

- delete what never runs: C/Cython sources and test suites shipped inside wheels;
- strip debug info from extension modules (not from libraries patched by auditwheel, i.e. with
  an RPATH/RUNPATH: strip can corrupt patchelf'ed files);
- keep integration translations only for the languages in $KEEP_TRANSLATIONS (space separated,
  default "en"; "all" keeps every one): ~25,000 small files, 63 MB; Home Assistant falls back
  to English;
- delete the frontend's JavaScript source maps (*.map, ~55 MB in 2,000 files): only a browser's
  developer tools fetch them;
- delete the uv binaries (~56 MB): homeassistant requires the uv distribution to install
  integrations' requirements, which it never does with `--skip-pip`; the distribution's metadata
  stays (pip check passes), and Home Assistant's list of installed packages (`python -m uv pip
  list`, for diagnostics) comes back empty, as it does when the command fails;
- byte-compile everything except the integrations that cannot load in this image anyway
  (a requirement of their manifest is not installed: `--skip-pip` never installs it). They
  would be compiled on first import; compiling all 1,224 integrations doubles the build.
"""

from __future__ import annotations

import compileall
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SITE = Path(sysconfig.get_paths()["purelib"])
COMPONENTS = SITE / "homeassistant" / "components"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def delete_dev_files() -> None:
    for pattern in ("*.c", "*.pyx", "*.pxd"):
        for f in SITE.rglob(pattern):
            if f.is_file():
                f.unlink()
    for d in sorted(SITE.rglob("tests"), reverse=True):
        if d.is_dir():
            shutil.rmtree(d)
    # scapy's wheel installs its own test suite as a top-level package "test"
    shutil.rmtree(SITE / "test", ignore_errors=True)


def strip_debug_info() -> None:
    for f in SITE.rglob("*.so*"):
        if not f.is_file() or f.read_bytes()[:4] != b"\x7fELF":
            continue
        dyn = subprocess.run(["readelf", "-d", str(f)], capture_output=True, text=True).stdout
        if "(RPATH)" in dyn or "(RUNPATH)" in dyn:
            continue
        subprocess.run(["strip", "--strip-debug", str(f)], check=True)


def drop_frontend_source_maps() -> None:
    for f in (SITE / "hass_frontend").rglob("*.map"):
        if f.is_file():
            f.unlink()


def drop_uv_binaries() -> None:
    for name in ("uv", "uvx"):
        (Path(sys.prefix) / "bin" / name).unlink(missing_ok=True)


def trim_translations() -> None:
    keep = os.environ.get("KEEP_TRANSLATIONS", "en").split()
    if "all" in keep:
        return
    for f in COMPONENTS.glob("*/translations/*.json"):
        if f.stem not in keep:
            f.unlink()


def unloadable_integrations() -> list[str]:
    installed = {norm(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    skip = []
    for manifest in COMPONENTS.glob("*/manifest.json"):
        reqs = json.loads(manifest.read_text()).get("requirements", [])
        names = [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r) for r in reqs]
        if not all(m and norm(m[0]) in installed for m in names):
            skip.append(manifest.parent.name)
    return sorted(skip)


def main() -> None:
    delete_dev_files()
    strip_debug_info()
    drop_frontend_source_maps()
    drop_uv_binaries()
    trim_translations()
    skip = unloadable_integrations()
    total = len(list(COMPONENTS.glob("*/manifest.json")))
    print(f"slim: byte-compiling, with {total - len(skip)} of {total} integrations", flush=True)
    rx = re.compile(r"/homeassistant/components/(" + "|".join(map(re.escape, skip)) + r")/")
    # Like pip, ignore files that do not compile (aenum ships Python 2 only modules).
    compileall.compile_dir(SITE, quiet=2, workers=0, rx=rx if skip else None)


if __name__ == "__main__":
    main()
