"""`import attribution` must not pull in lightning (the core is Lightning-free)."""
import subprocess
import sys


def test_import_attribution_does_not_import_lightning():
    code = ("import sys, attribution\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]\n"
            "print(','.join(bad) or 'clean')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean", f"attribution imported {out.stdout.strip()}"


def test_no_lightning_in_attribution_sources():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "attribution"
    offenders = [p.name for p in root.glob("*.py") if p.name != "masks.py"
                 and any(line.lstrip().startswith(("import lightning", "from lightning", "import pytorch_lightning",
                                                   "from pytorch_lightning"))
                         for line in p.read_text().splitlines())]
    assert offenders == []
