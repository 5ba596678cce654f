"""The Pythons that carry the hosts' gradio versions: 3.41 (A1111, reForge, Forge Classic) and
4.40 (Forge). ``.ci/run`` makes them in ``.venvs/gradio3`` and ``.venvs/gradio4``;
OMG_GRADIO3_PYTHON / OMG_GRADIO4_PYTHON point elsewhere. The main test venv has no gradio,
so whatever builds gradio components runs in one of these, in a subprocess."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gradio_python(version: int) -> str | None:
    """That Python's path, or None when it is not there (the test then skips, saying so)."""
    path = os.environ.get(f"OMG_GRADIO{version}_PYTHON") or str(ROOT / ".venvs" / f"gradio{version}" / "bin" / "python")
    return path if Path(path).exists() else None
