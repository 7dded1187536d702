"""Make a bare GPU machine ready for bench/gpu/check.py, without network.

The machine is expected to have Python 3.12 with torch, transformers, timm, numpy, pandas,
pyarrow, scipy and scikit-learn. This script says which of the modules patchbalance and the
check need are missing and why, installs those from the wheels that bench/gpu/fetch_wheels.sh
downloaded into bench/gpu/wheels/ (`pip install --no-index --find-links`, into `--site`), then
installs patchbalance from the working tree without its dependencies, and writes what it did
to `--report` (JSON).

    python3 bench/gpu/setup_env.py --site /tmp/site --report OUT/setup.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WHEELS = HERE / "wheels"

# (module to import, distribution that provides it, why the check needs it)
NEEDED = [
    ("rasterio", "rasterio", "reads every raster window"),
    ("affine", "affine", "needed by rasterio"),
    ("cligj", "cligj", "needed by rasterio"),
    ("click_plugins", "click-plugins", "needed by rasterio"),
    ("pydantic", "pydantic", "validates the configurations"),
    ("pydantic_core", "pydantic-core", "needed by pydantic"),
    ("annotated_types", "annotated-types", "needed by pydantic"),
    ("typing_inspection", "typing-inspection", "needed by pydantic"),
    ("omegaconf", "omegaconf", "loads the configurations"),
    ("antlr4", "antlr4-python3-runtime", "needed by omegaconf"),
    ("hydra", "hydra-core", "train: instantiates the model, loss and optimizer"),
    ("segmentation_models_pytorch", "segmentation-models-pytorch", "train: the Unet"),
    ("faiss", "faiss-cpu", "the kNN baseline (IndexFlatIP on the CPU cores)"),
]
# Expected on the machine already: only reported, never installed.
PRESENT = [
    "torch",
    "transformers",
    "timm",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "sklearn",
    "PIL",
    "safetensors",
    "huggingface_hub",
    "tqdm",
    "yaml",
    "typer",
]


def _version(module: str) -> str | None:
    try:
        return str(getattr(__import__(module), "__version__", "?"))
    except Exception:  # noqa: BLE001 - a broken install is reported, not raised
        return None


def _pip(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheel_folder(folder: Path = WHEELS) -> dict[str, Path]:
    """Return the wheels in `folder` by canonical distribution name."""
    from packaging.utils import parse_wheel_filename

    wheels = {}
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        name, _, _, _ = parse_wheel_filename(path.name)
        wheels[str(name)] = path
    return wheels


def _wheel_requirements(wheel: Path) -> list:
    """Return the requirements of `wheel` that apply here (no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode("utf-8").splitlines()
    requirements = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                requirements.append(requirement)
    return requirements


def plan_install(
    missing: list[str],
    wheels: dict[str, Path],
    installed: Callable[[str], str | None] = _installed_version,
) -> tuple[list[str], list[str]]:
    """Return `(wheels to install, unmet requirements)` for the `missing` distributions.

    A requirement of a wheel to install is met by the machine's copy when its version fits;
    otherwise the folder's wheel of it joins the install (e.g. a newer typing-extensions).
    """
    from packaging.utils import canonicalize_name, parse_wheel_filename

    chosen = [str(canonicalize_name(name)) for name in missing]
    unmet = [f"{name}: no wheel in {WHEELS}" for name in chosen if name not in wheels]
    queue = [name for name in chosen if name in wheels]
    while queue:
        name = queue.pop(0)
        for requirement in _wheel_requirements(wheels[name]):
            dependency = str(canonicalize_name(requirement.name))
            if dependency in chosen:
                version = parse_wheel_filename(wheels[dependency].name)[1]
                if not requirement.specifier.contains(version, prereleases=True):
                    unmet.append(f"{name} needs {requirement}, the wheel is {version}")
                continue
            have = installed(dependency)
            if have is not None and requirement.specifier.contains(have, prereleases=True):
                continue
            if dependency in wheels:
                print(
                    f"setup: {name} needs {requirement}, the machine has {have or 'none'}: adding it"
                )
                chosen.append(dependency)
                queue.append(dependency)
            else:
                unmet.append(f"{name} needs {requirement}, the machine has {have or 'none'}")
    return [wheels[name].name for name in chosen if name in wheels], unmet


def _install_missing(site: Path, report: dict) -> bool:
    """Install the missing distributions from the wheel folder; return True when all went in."""
    missing = [(m, d, why) for m, d, why in NEEDED if importlib.util.find_spec(m) is None]
    report["missing"] = [{"module": m, "distribution": d, "why": why} for m, d, why in missing]
    if not missing:
        print("setup: every needed module is already installed")
        return True
    for module, distribution, why in missing:
        print(f"setup: missing {module} ({why}): installing {distribution} from {WHEELS}")
    wheels = wheel_folder()
    if not wheels:
        print(
            f"setup: no wheels in {WHEELS}; run bash bench/gpu/fetch_wheels.sh where there is "
            "network and bring the folder along"
        )
        return False
    files, unmet = plan_install([d for _, d, _ in missing], wheels)
    report["wheels_installed"], report["unmet"] = files, unmet
    for line in unmet:
        print(f"setup: unmet requirement: {line}")
    started = time.perf_counter()
    result = _pip(
        [
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(WHEELS),
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(site),
            *[str(WHEELS / name) for name in files],
        ]
    )
    report["install_seconds"] = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        print("setup: pip could not install the wheels:\n" + result.stderr.strip())
        report["install_error"] = result.stderr.strip()[-2000:]
        return False
    print(f"setup: installed {len(files)} wheel(s) into {site}: {', '.join(files)}")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    still = [m for m, _, _ in missing if importlib.util.find_spec(m) is None]
    if still:
        print(f"setup: still missing after the install: {', '.join(still)}")
        report["still_missing"] = still
        return False
    return not unmet


def _install_patchbalance(site: Path, report: dict) -> None:
    """Install the working tree's patchbalance into `site` without its dependencies."""
    result = _pip(
        [
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--no-compile",
            "--upgrade",
            "--target",
            str(site),
            str(REPO),
        ]
    )
    if result.returncode == 0:
        print(f"setup: installed patchbalance from {REPO} into {site} (--no-deps)")
        report["patchbalance"] = f"installed from the working tree into {site}"
    else:
        # The package needs setuptools >= 77 to build; the source folder works as well.
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        print(f"setup: pip could not install patchbalance ({last}); using {REPO / 'src'} instead")
        report["patchbalance"] = f"not installed ({last}); imported from {REPO / 'src'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, required=True, help="where to install")
    parser.add_argument("--report", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    args.site.mkdir(parents=True, exist_ok=True)
    report: dict = {"python": sys.version.split()[0], "site": str(args.site)}
    report["present"] = {m: _version(m) for m in PRESENT}
    absent = [m for m, v in report["present"].items() if v is None]
    for module, version in report["present"].items():
        print(f"setup: {module} {version if version else 'MISSING (expected on the machine)'}")
    ok = _install_missing(args.site, report) and not absent
    _install_patchbalance(args.site, report)
    report["installed_versions"] = {}
    for _, distribution, _ in NEEDED:
        try:
            report["installed_versions"][distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            report["installed_versions"][distribution] = None
    report["ok"] = ok
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
