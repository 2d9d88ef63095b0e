"""tools/sanitize_driver.py's choice of parts (the parts themselves need a GPU and run under
tools/sanitize.sh)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_misspelt_part_is_refused_before_any_part_runs():
    env = dict(os.environ, SANITIZE_PARTS="dense,denes",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "sanitize_driver.py")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "SANITIZE_PARTS: unknown part(s) denes; the parts are dense, ordered" in result.stderr
    assert "ran " not in result.stdout  # each part prints "ran ..." when it ends
