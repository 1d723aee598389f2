"""tools/install_detectron2.py leaves an installation whose RECORD lists exactly its files."""

import csv
import importlib.util
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "install_detectron2", REPO / "tools" / "install_detectron2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_lists_exactly_the_installed_files(tmp_path):
    tool = load_tool()
    files = {
        "detectron2/__init__.py": b"__version__ = '0.7'\n",
        "detectron2/layers/nms.py": b"def nms(): ...\n",
        "detectron2/_C.cpython-310-x86_64-linux-gnu.so": b"\x7fELF compiled",
        "sal_detectron2-0.7.2.dist-info/METADATA": b"Name: sal-detectron2\nVersion: 0.7.2\n",
    }
    wheel = tmp_path / "sal_detectron2-0.7.2-cp310-cp310-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        record = "".join(
            f"{name},{tool._record_hash(data)},{len(data)}\n" for name, data in files.items()
        )
        archive.writestr(
            "sal_detectron2-0.7.2.dist-info/RECORD",
            record + "sal_detectron2-0.7.2.dist-info/RECORD,,\n",
        )
    site = tmp_path / "site-packages"
    site.mkdir()

    assert tool.install_pure_python(wheel, site) == 3
    on_disk = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()}
    with open(site / "sal_detectron2-0.7.2.dist-info" / "RECORD", newline="") as stream:
        rows = list(csv.reader(stream))
    assert {row[0] for row in rows} == on_disk
    assert not any(name.endswith(".so") for name in on_disk)
    for name, digest, size in rows:
        if digest:  # every file but RECORD itself carries its true hash and size
            data = (site / name).read_bytes()
            assert (digest, int(size)) == (tool._record_hash(data), len(data)), name
