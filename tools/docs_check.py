"""Offline docs check (Quarto cannot be installed offline).

1. `nbdev_proc_nbs` processes the notebooks into `_proc/` (a `quarto` stub on PATH keeps nbdev from trying to
   install Quarto; nothing is rendered by it).
2. `smalldocs render _proc` renders the processed notebooks to HTML in `_proc/_docs/`.
3. Headless Chromium (Playwright) opens every page over http://127.0.0.1 and checks that it loads, carries the
   notebook's title, shows its figures (every <img> decoded), and shows no error output; the committed notebooks
   themselves must hold no error outputs.
4. A screenshot of the index page is written to `_proc/_docs/index.png` (or `--screenshot PATH`).
"""
from __future__ import annotations

import argparse, functools, http.server, json, os, shutil, stat, subprocess, sys, tempfile, threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def find_chromium() -> str:
    for c in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              shutil.which("google-chrome")):
        if c and Path(c).exists(): return c
    sys.exit("docs check: no Chromium found; install it (Debian: apt-get install -y chromium) or set CHROMIUM=/path")


def notebook_titles() -> dict[str, str]:
    "Page name → the notebook's `# Title`; also fail on any committed error output."
    titles, errors = {}, []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        first = "".join(cells[0]["source"]).strip().splitlines()[0]
        titles[nb.stem] = first.lstrip("# ").strip()
        for c in cells:
            for o in c.get("outputs", []):
                if o.get("output_type") == "error" or (o.get("name") == "stderr" and "Traceback" in "".join(o.get("text", ""))):
                    errors.append(f"{nb.name}: error output in a cell")
    if errors: sys.exit("docs check failed:\n  " + "\n  ".join(errors))
    return titles


def build() -> Path:
    stub = Path(tempfile.mkdtemp())
    (stub / "quarto").write_text("#!/bin/sh\necho 'quarto stub (offline docs check)' >&2\nexit 0\n")
    (stub / "quarto").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{BIN}:{os.environ['PATH']}"}
    shutil.rmtree(ROOT / "_proc", ignore_errors=True)
    sidebar = (ROOT / "nbs" / "sidebar.yml").read_bytes() if (ROOT / "nbs" / "sidebar.yml").exists() else None
    try:
        subprocess.run([str(BIN / "nbdev_proc_nbs")], cwd=ROOT, env=env, check=True)
    finally:  # nbdev regenerates nbs/sidebar.yml; keep the committed one
        if sidebar is not None: (ROOT / "nbs" / "sidebar.yml").write_bytes(sidebar)
    subprocess.run([str(BIN / "smalldocs"), "render", "--quiet", str(ROOT / "_proc")], cwd=ROOT, env=env, check=True)
    return ROOT / "_proc" / "_docs"


def check(site: Path, titles: dict[str, str], screenshot: Path) -> list[str]:
    from playwright.sync_api import sync_playwright
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    problems, report = [], []
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for stem, title in titles.items():
            url = f"{base}/{stem}.html"
            resp = page.goto(url, wait_until="load")
            if resp is None or not resp.ok:
                problems.append(f"{stem}: HTTP {resp.status if resp else 'no response'}"); continue
            page_title, body = page.title(), page.inner_text("body")
            imgs = page.eval_on_selector_all("main img, #quarto-content img, body img",
                                             "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
            local = [(s, ok) for s, ok in imgs if not (s or "").startswith(("http://", "https://"))]  # offline: skip remote badges
            broken = [s for s, ok in local if not ok]
            n_ok = sum(ok for _, ok in local)
            if not page.query_selector("a[href*='colab.research.google.com']"):
                problems.append(f"{stem}: no Colab badge link")
            if title.split("—")[-1].strip().lower() not in (page_title + body[:2000]).lower():
                problems.append(f"{stem}: title {title!r} not on the page (page title {page_title!r})")
            if n_ok == 0: problems.append(f"{stem}: no figure shown")
            if broken: problems.append(f"{stem}: images that do not load: {broken[:3]}")
            for bad in ("Traceback (most recent call last)", "NameError:", "ModuleNotFoundError:"):
                if bad in body: problems.append(f"{stem}: error output on the page ({bad})")
            report.append(f"  {stem:<22} {n_ok:>3} figures  title: {page_title[:60]}")
            if stem == "index":
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    server.shutdown()
    print("\n".join(report))
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screenshot", default=None, help="where to save the index page screenshot")
    ap.add_argument("--no-build", action="store_true", help="check an existing _proc/_docs")
    a = ap.parse_args()
    titles = notebook_titles()
    site = ROOT / "_proc" / "_docs" if a.no_build else build()
    missing = [s for s in titles if not (site / f"{s}.html").exists()]
    if missing: sys.exit(f"docs check failed: pages not rendered: {missing}")
    problems = check(site, titles, Path(a.screenshot) if a.screenshot else site / "index.png")
    if problems: sys.exit("docs check failed:\n  " + "\n  ".join(problems))
    print(f"docs check: {len(titles)} pages passed")


if __name__ == "__main__":
    main()
