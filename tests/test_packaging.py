"""Installing: `pip install .` puts the CLI under lccompress.cli (nothing named `cli` at the top of
site-packages), `pip install -e .` maps lccompress.cli onto the repository's cli/ folder, and both
`lccompress` and `python -m lccompress` run it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import lccompress
import lccompress.cli

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_dot_gives_lccompress_cli_and_no_top_level_cli(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("lccompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lccompress", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert {"lccompress/cli/__init__.py", "lccompress/cli/app.py", "lccompress/__main__.py"} <= set(names)
    # every package of the source tree is in the wheel
    for init in list((ROOT / "lccompress").rglob("__init__.py")) + [ROOT / "cli" / "__init__.py"]:
        rel = init.relative_to(ROOT).as_posix()
        assert ("lccompress/" + rel if rel.startswith("cli/") else rel) in names, rel
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True, timeout=300, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import lccompress.cli, lccompress.api; print(lccompress.cli.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert Path(out.strip()).resolve() == (site / "lccompress" / "cli" / "__init__.py").resolve()
    r = subprocess.run([sys.executable, "-m", "lccompress", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "Example: lccompress" in r.stdout


def test_source_tree_maps_the_cli_folder():
    """Run from this checkout (the editable install CI makes), lccompress.cli is the cli/ folder."""
    if Path(lccompress.__file__).resolve().parent != ROOT / "lccompress":
        return  # an installed copy is under test, not this checkout (covered by the wheel test)
    assert Path(lccompress.cli.__file__).resolve() == ROOT / "cli" / "__init__.py"


def test_console_script_and_python_m_show_examples():
    for cmd in (["lccompress", "--help"], [sys.executable, "-m", "lccompress", "--help"],
                [sys.executable, "-m", "lccompress", "prune", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Example: lccompress" in r.stdout, (cmd, r.stderr)


def test_help_imports_no_heavy_dependency():
    """`lccompress --help` (and a command's help) pays for torch only: onnx, onnxruntime, scikit-learn,
    safetensors and transformers load when a command uses them."""
    code = ("import sys\nfrom lccompress.cli import main\n"
            "for args in (['--help'], ['prune', '--help'], ['export', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "heavy = {'onnx', 'onnxruntime', 'sklearn', 'safetensors', 'transformers'}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
