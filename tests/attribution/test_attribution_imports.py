"""`import attribution` must not pull in lightning at run time (the static rule is the import-linter contract
"core-without-lightning" in setup.cfg, checked by `make test`)."""
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
