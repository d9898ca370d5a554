"""Write README.md from nbs/index.ipynb (what `nbdev_readme` does with Quarto, done offline).

Markdown cells are copied; hidden cells are dropped; a visible code cell's image output is not copied (GitHub
cannot show it), and links to notebooks point at nbs/. Run `python tools/make_readme.py --check` to verify that
README.md is up to date (pytest does).
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render() -> str:
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text(encoding="utf-8"))
    parts = []
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] != "markdown": continue
        src = re.sub(r"\]\((\d\d_\w+\.ipynb|index\.ipynb)\)", r"](nbs/\1)", src)
        src = re.sub(r"\]\(images/", "](nbs/images/", src)
        parts.append(src.strip())
    header = "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->"
    return header + "\n\n" + "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if (ROOT / "README.md").read_text(encoding="utf-8") == text else "README.md is out of date: run python tools/make_readme.py")
    (ROOT / "README.md").write_text(text, encoding="utf-8")
