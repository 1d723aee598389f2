#!/usr/bin/env python3
"""Install detectron2 into the running Python environment, unless it already has one.

detectron2's authors do not publish it on PyPI. A user who built it from the official source keeps
that build: this script then does nothing. Otherwise it fetches the registry's ``sal-detectron2``
wheel (detectron2's main branch repackaged, tagged for CPython 3.10) and installs its pure-Python
part into this environment's site-packages. Its compiled ``detectron2/_C`` is for CPython 3.10 and
is left out: ROIAlign and NMS come from torchvision and COCO evaluation from pycocotools.

Usage (the Makefile runs it inside .venv)::

    python tools/install_detectron2.py [--force] [--cache DIR]
"""

import argparse
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "sal-detectron2"
WHEEL_VERSION = "0.7.2"


def existing_detectron2() -> str:
    """Return the location of an importable detectron2, or '' if there is none."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or spec.origin is None:
        return ""
    return str(Path(spec.origin).parent)


def download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.10",
        "--implementation",
        "cp",
        "--dest",
        str(dest),
        f"{WHEEL_NAME}=={WHEEL_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("sal_detectron2-*.whl"))
    if result.returncode != 0 or not wheels:
        sys.exit(
            f"install_detectron2: could not download {WHEEL_NAME}=={WHEEL_VERSION} from the "
            f"package registry.\n{result.stdout}{result.stderr}\nEither make the registry "
            "reachable, or install detectron2 from its official source into this environment "
            "(pip install --no-build-isolation <path to detectron2 checkout>) and run this again."
        )
    return wheels[-1]


def extract_pure_python(wheel: Path, site_packages: Path) -> int:
    """Unpack every file of the wheel except compiled extensions; return how many were written."""
    written = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.filename.endswith(".so") or member.is_dir():
                continue
            archive.extract(member, site_packages)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    parser.add_argument("--cache", type=Path, default=None, help="keep the downloaded wheel here")
    args = parser.parse_args()

    location = existing_detectron2()
    if location and not args.force:
        print(f"install_detectron2: using the detectron2 already installed at {location}")
        return

    site_packages = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        wheel = download_wheel(cache)
        count = extract_pure_python(wheel, site_packages)
    print(f"install_detectron2: installed {count} files of {wheel.name} into {site_packages}")

    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import detectron2.modeling, detectron2.engine; print(detectron2.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        sys.exit(
            "install_detectron2: detectron2 was unpacked but does not import:\n"
            f"{check.stderr}\nIts runtime dependencies come from requirements.txt "
            "(note: it needs setuptools<81 for pkg_resources); install them first."
        )
    print(f"install_detectron2: detectron2 {check.stdout.strip()} imports")


if __name__ == "__main__":
    main()
