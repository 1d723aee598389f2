#!/usr/bin/env python3
"""Install detectron2 into the running Python environment, unless it already has one.

detectron2's authors do not publish it on PyPI. A user who built it from the official source keeps
that build: this script then does nothing. Otherwise it fetches the registry's ``sal-detectron2``
wheel (detectron2's main branch repackaged, tagged for CPython 3.10) and installs its pure-Python
part into this environment's site-packages. Its compiled ``detectron2/_C`` is for CPython 3.10 and
is left out: ROIAlign and NMS come from torchvision and COCO evaluation from pycocotools. The
installed ``.dist-info`` RECORD lists exactly the files written, so pip can list, check and
uninstall the installation (``pip uninstall sal-detectron2``).

Usage (the Makefile runs it inside .venv)::

    python tools/install_detectron2.py [--force] [--cache DIR]
"""

import argparse
import base64
import csv
import hashlib
import importlib.util
import io
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


def _record_hash(data: bytes) -> str:
    """A RECORD hash field (PEP 376/427): sha256, urlsafe base64 without padding."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def install_pure_python(wheel: Path, site_packages: Path) -> int:
    """Unpack every file of the wheel except compiled extensions; return how many were written.

    The ``.dist-info`` RECORD is rewritten to list exactly the files written (plus INSTALLER and
    itself), so ``pip check``, ``pip show -f`` and ``pip uninstall`` see this installation as it is.
    """
    with zipfile.ZipFile(wheel) as archive:
        members = [
            member
            for member in archive.infolist()
            if not member.is_dir() and not member.filename.endswith(".so")
        ]
        record = next(m.filename for m in members if m.filename.endswith(".dist-info/RECORD"))
        with archive.open(record) as stream:
            rows = list(csv.reader(io.TextIOWrapper(stream, encoding="utf-8")))
        for member in members:
            if member.filename != record:
                archive.extract(member, site_packages)
    written = {member.filename for member in members} - {record}
    installer = record.rsplit("/", 1)[0] + "/INSTALLER"
    installer_text = b"vimdet-install_detectron2\n"
    (site_packages / installer).write_bytes(installer_text)
    kept = [row for row in rows if row and row[0] in written]
    kept += [[installer, _record_hash(installer_text), str(len(installer_text))], [record, "", ""]]
    with open(site_packages / record, "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream, lineterminator="\n").writerows(kept)
    return len(written)


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
        count = install_pure_python(wheel, site_packages)
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
