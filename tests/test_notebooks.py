"""The committed notebooks: executed at a real scale, clean text, and a library that follows the course order."""
import ast, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
SCALE_LINE = re.compile(r"this notebook runs at scale: (\w+)")


def _cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text(encoding="utf-8"))["cells"]


def _outputs_text(cell: dict) -> str:
    return "".join("".join(o.get("text", [])) + "".join(o.get("data", {}).get("text/plain", []))
                   for o in cell.get("outputs", []))


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.name)
def test_committed_outputs_come_from_a_real_scale(nb):
    "Each numbered notebook prints its scale in its first cells; the committed run was `cpu` or `gpu`, never `ci`."
    scales = [m.group(1) for c in _cells(nb) for m in SCALE_LINE.finditer(_outputs_text(c))]
    assert scales, f"{nb.name}: no committed 'this notebook runs at scale: ...' line (execute it with `make execute`)"
    assert set(scales) <= {"cpu", "gpu"}, f"{nb.name} was executed at scale {scales}; commit it executed at cpu or gpu"


@pytest.mark.parametrize("nb", NBS + [ROOT / "nbs" / "index.ipynb"], ids=lambda p: p.name)
def test_text_speaks_to_learners(nb):
    talk = re.compile(r"\bthe issue\b|\bissue's\b|\bthis task\b|available to this work|\bthis session\b", re.I)
    ctrl = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
    for i, c in enumerate(_cells(nb)):
        src = "".join(c["source"])
        if c["cell_type"] == "markdown":
            assert not talk.search(src), f"{nb.name}[{i}]: {talk.search(src).group(0)!r}"
            assert not ctrl.search(src), f"{nb.name}[{i}]: a control character (a LaTeX escape such as \\a read as BEL?)"
        out = _outputs_text(c)
        for noise in ("gpuGetDeviceCount", "USDT:"):
            assert noise not in out, f"{nb.name}[{i}] output carries profiler noise {noise!r}"


def _module_notebooks() -> dict[str, str]:
    "module name → the notebook it is exported from (nbdev's header)."
    out = {}
    for py in (ROOT / "ldm_course").glob("*.py"):
        head = next((l for l in py.read_text(encoding="utf-8").splitlines()[:12] if "File to edit:" in l), None)
        if head: out[py.stem] = Path(head.split("File to edit: ")[1].rstrip(". ")).name
    return out


def test_no_module_imports_a_later_notebook():
    "The library follows the course order: a module imports only modules of earlier notebooks (so no cycles)."
    order = {m: nb for m, nb in _module_notebooks().items()}
    for mod, nb in order.items():
        tree = ast.parse((ROOT / "ldm_course" / f"{mod}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module.removeprefix("ldm_course.").lstrip(".") if (node.level or node.module.startswith("ldm_course.")) else None
            elif isinstance(node, ast.Import):
                name = next((a.name.removeprefix("ldm_course.") for a in node.names if a.name.startswith("ldm_course.")), None)
            else:
                continue
            if name in order and name != mod:
                assert order[name] < nb, f"{mod} ({nb}) imports {name} ({order[name]}), a later notebook's module"
