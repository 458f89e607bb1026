"""The committed gRPC code in agentd/v1 matches proto/ (scripts/gen-proto)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = sorted(p.name for p in (tmp_path / "agentd" / "v1").iterdir())
    committed = sorted(p.name for p in (ROOT / "agentd" / "v1").iterdir()
                       if p.name != "__init__.py" and p.suffix in {".py", ".pyi"})
    assert generated == committed, "run scripts/gen-proto: the set of generated files changed"
    fresh, ours = tmp_path / "agentd" / "v1", ROOT / "agentd" / "v1"
    stale = [name for name in generated if (fresh / name).read_bytes() != (ours / name).read_bytes()]
    assert stale == [], f"stale generated code, run scripts/gen-proto: {stale}"
