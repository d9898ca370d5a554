"""Offline docs check (Quarto cannot be installed offline).

1. `nbdev_proc_nbs` processes the notebooks into `_proc/` (a `quarto` stub on PATH keeps nbdev from trying to
   install Quarto; nothing is rendered by it).
2. `smalldocs render _proc` renders the processed notebooks to HTML in `_proc/_docs/`; a broken link fails.
3. The pages load KaTeX from a CDN. The check installs the same KaTeX version from npm into `tools/.katex/`
   (git-ignored; once), copies it into the site and points every page at that local copy, so formulas render
   offline exactly as they will online.
4. Headless Chromium (Playwright) opens every page over http://127.0.0.1 (every request to another host is
   refused) and checks that it loads, carries the notebook's title, shows its figures (every <img> decoded),
   shows no error output, and that every formula rendered: no KaTeX error, no `\\(`, `\\[`, `$` or TeX command
   (`\\hat`) left as raw text anywhere on the page. The notebooks' markdown must hold no control characters
   (an unescaped `\\a` in a Python string becomes BEL), an even number of `$` per cell and no maths in
   headings (the table of contents shows it as raw TeX); the committed notebooks must hold no error outputs.
5. Screenshots: the index page (`_proc/_docs/index.png` or `--screenshot PATH`) and the first formulas of
   02_schedules (`_proc/_docs/math.png` or `--math-screenshot PATH`).

Prerequisites: Chromium (Debian: `apt-get install -y chromium`, or `CHROMIUM=/path`), the `playwright` Python
package (a dev requirement) and npm (or `KATEX_DIST=/path/to/katex/dist`). Where one is missing the check prints
a one-line notice and passes, unless `DOCS_CHECK=required` or `CI=true` is set: then it fails. `DOCS_CHECK=skip`
skips it.
"""
from __future__ import annotations

import argparse, functools, http.server, json, os, re, shutil, subprocess, sys, tempfile, threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KATEX_HOME = ROOT / "tools" / ".katex"  # npm prefix for the local KaTeX (git-ignored by tools/.gitignore)
CDN_KATEX = re.compile(r"https://cdn\.jsdelivr\.net/npm/katex@[0-9.]+/dist")
MATH_PAGE = "02_schedules"
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def required() -> bool:
    return os.environ.get("DOCS_CHECK", "").lower() == "required" or os.environ.get("CI", "").lower() in ("true", "1")


def unavailable(reason: str):
    "A prerequisite is missing: fail where the check is required, else say so in one line and pass."
    if required(): sys.exit(f"docs check failed: {reason} (DOCS_CHECK=required or CI=true)")
    print(f"docs check skipped: {reason} (set DOCS_CHECK=required to make this an error)")
    sys.exit(0)


def find_chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              shutil.which("google-chrome")):
        if c and Path(c).exists(): return c
    return None


def katex_version() -> str:
    "The KaTeX version smalldocs' pages ask the CDN for."
    from smalldocs.layout import KATEX
    m = re.search(r"katex@([0-9.]+)/", KATEX)
    return m.group(1) if m else "0.16.11"


def local_katex() -> tuple[Path | None, str]:
    "KaTeX's `dist/` folder, installed from npm on first use; (None, why) when it cannot be had."
    if os.environ.get("KATEX_DIST"):
        d = Path(os.environ["KATEX_DIST"])
        return (d, "") if (d / "katex.min.js").exists() else (None, f"KATEX_DIST={d} has no katex.min.js")
    version = katex_version()
    dist = KATEX_HOME / "node_modules" / "katex" / "dist"
    pkg = KATEX_HOME / "node_modules" / "katex" / "package.json"
    if pkg.exists() and json.loads(pkg.read_text()).get("version") == version and (dist / "katex.min.js").exists():
        return dist, ""
    npm = shutil.which("npm")
    if npm is None: return None, f"npm not found, needed once to install KaTeX {version} (Debian: apt-get install -y npm)"
    KATEX_HOME.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([npm, "install", "--prefix", str(KATEX_HOME), "--no-audit", "--no-fund", "--no-save",
                        "--loglevel=error", f"katex@{version}"], capture_output=True, text=True)
    if r.returncode or not (dist / "katex.min.js").exists():
        return None, f"npm could not install katex@{version}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return dist, ""


def markdown_cells(nb: Path):
    "(index, source) of each markdown cell."
    for i, c in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
        if c["cell_type"] == "markdown": yield i, "".join(c["source"])


def strip_code(md: str) -> str:
    "Markdown without fenced code blocks and inline code spans (where `$` is not maths)."
    md = re.sub(r"^(```|~~~).*?^\1", "", md, flags=re.S | re.M)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", md, flags=re.S)


def source_problems(nb: Path) -> list[str]:
    "Control characters and unbalanced `$` in a notebook's markdown cells."
    out = []
    for i, src in markdown_cells(nb):
        for m in CONTROL.finditer(src):
            out.append(f"{nb.stem} cell {i}: control character {m.group()!r} in {src[max(0, m.start() - 30):m.end() + 30]!r}")
        text = strip_code(src).replace("\\$", "")
        for line in text.splitlines():
            if line.startswith("#") and "$" in line:
                out.append(f"{nb.stem} cell {i}: maths in a heading shows as raw TeX in the table of contents "
                           f"(write it in Unicode): {line.strip()[:100]!r}")
        if text.count("$") % 2:
            lines = [l for l in text.splitlines() if l.count("$") % 2]
            out.append(f"{nb.stem} cell {i}: odd number of `$` (unbalanced maths) near {(lines or [text])[0].strip()[:100]!r}")
    return out


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


def build(katex_dist: Path) -> tuple[Path, list[str]]:
    "Render the site into _proc/_docs with KaTeX served from the site itself; returns (site, broken links)."
    stub = Path(tempfile.mkdtemp())
    (stub / "quarto").write_text("#!/bin/sh\necho 'quarto stub (offline docs check)' >&2\nexit 0\n")
    (stub / "quarto").chmod(0o755)
    # nbdev warns about every cell that mixes imports with other code (each notebook's first cell prints its scale)
    env = {**os.environ, "PATH": f"{stub}:{BIN}:{os.environ['PATH']}",
           "PYTHONWARNINGS": "ignore:Found cells containing imports and other code:UserWarning"}
    shutil.rmtree(ROOT / "_proc", ignore_errors=True)
    sidebar = (ROOT / "nbs" / "sidebar.yml").read_bytes() if (ROOT / "nbs" / "sidebar.yml").exists() else None
    try:
        subprocess.run([str(BIN / "nbdev_proc_nbs")], cwd=ROOT, env=env, check=True)
    finally:  # nbdev regenerates nbs/sidebar.yml; keep the committed one
        if sidebar is not None: (ROOT / "nbs" / "sidebar.yml").write_bytes(sidebar)
        shutil.rmtree(stub, ignore_errors=True)
    r = subprocess.run([str(BIN / "smalldocs"), "render", "--quiet", str(ROOT / "_proc")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    # smalldocs says which Quarto-only settings it ignores (nbdev's `output-file`, the commonmark format, keep-md):
    # expected here, not shown; anything else it says is shown, and a broken link fails the check
    quarto_only = ("output-file is not read", "is not built: smalldocs makes only html", "keep-md is ignored")
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and not any(q in l for q in quarto_only)]
    if r.returncode: sys.exit("docs check failed: smalldocs render:\n  " + "\n  ".join(lines))
    if lines: print("\n".join(lines))
    site = ROOT / "_proc" / "_docs"
    shutil.copytree(katex_dist, site / "site_libs" / "katex", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.mjs", "katex.js", "katex.css", "*.ttf", "*.woff"))
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        if CDN_KATEX.search(html):
            rel = os.path.relpath(site / "site_libs" / "katex", page.parent)
            page.write_text(CDN_KATEX.sub(rel, html), encoding="utf-8")
    return site, [l.split("warning: ", 1)[-1] for l in lines if "broken link" in l]


# In the page: what KaTeX made of the maths, and any TeX delimiter or `$` left as plain text
MATH_JS = r"""() => {
  const out = {katex: !!window.katex, rendered: document.querySelectorAll('.katex').length, errors: [], raw: []};
  for (const e of document.querySelectorAll('.katex-error'))
    out.errors.push([(e.getAttribute('title') || 'KaTeX error').slice(0, 160), e.textContent.slice(0, 120)]);
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);  // the page, its table of contents too
  while (walk.nextNode()) {
    const t = walk.currentNode, p = t.parentElement;
    if (!p || p.closest('pre, code, script, style, textarea, .katex, .katex-error, .cell-output-stdout, .cell-output-stderr')) continue;
    const s = t.nodeValue;
    if (/\\\(|\\\)|\\\[|\\\]|\$|\\[A-Za-z]+|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/.test(s))
      out.raw.push(s.trim().slice(0, 120));
  }
  return out;
}"""


def check(site: Path, titles: dict[str, str], chromium: str, screenshot: Path, math_screenshot: Path) -> list[str]:
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
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # offline and deterministic: only the local server answers
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
        console: list[str] = []
        page.on("console", lambda msg: console.append(msg.text))
        for stem, title in titles.items():
            url = f"{base}/{stem}.html"
            console.clear()
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
            math = page.evaluate(MATH_JS)
            has_math = "math inline" in (html := (site / f"{stem}.html").read_text(encoding="utf-8")) or "math display" in html
            if has_math and not math["katex"]:
                problems.append(f"{stem}: KaTeX did not load, no formula rendered")
            for msg, tex in math["errors"]:
                problems.append(f"{stem}: formula does not render: {tex!r} ({msg})")
            for text in math["raw"]:
                problems.append(f"{stem}: maths left as raw text: {text!r}")
            for msg in console:
                if "LaTeX-incompatible" in msg or "KaTeX" in msg:
                    problems.append(f"{stem}: KaTeX: {msg[:200]}")
            report.append(f"  {stem:<22} {n_ok:>3} figures {math['rendered']:>4} formulas  title: {page_title[:60]}")
            if stem == "index":
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=False)
            if stem == MATH_PAGE and math["rendered"]:
                # the first display formula, a little below the top of the window, with the prose around it
                page.evaluate("() => { const e = document.querySelector('.katex-display') || document.querySelector('.katex');"
                              " window.scrollTo(0, e.getBoundingClientRect().top + window.scrollY - 250); }")
                math_screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(math_screenshot), full_page=False)
        browser.close()
    server.shutdown()
    print("\n".join(report))
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screenshot", default=None, help="where to save the index page screenshot")
    ap.add_argument("--math-screenshot", default=None, help=f"where to save a screenshot of {MATH_PAGE}'s formulas")
    ap.add_argument("--no-build", action="store_true", help="check an existing _proc/_docs")
    a = ap.parse_args()
    if os.environ.get("DOCS_CHECK", "").lower() == "skip":
        print("docs check skipped: DOCS_CHECK=skip"); return
    chromium = find_chromium()
    if chromium is None:
        unavailable("no Chromium found; install it (Debian: apt-get install -y chromium) or set CHROMIUM=/path")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("the playwright package is not installed (pip install playwright)")
    katex_dist, why = local_katex()
    if katex_dist is None: unavailable(why)
    titles = notebook_titles()
    source = [p for nb in sorted((ROOT / "nbs").glob("*.ipynb")) for p in source_problems(nb)]
    if a.no_build: site, links = ROOT / "_proc" / "_docs", []
    else: site, links = build(katex_dist)
    missing = [s for s in titles if not (site / f"{s}.html").exists()]
    if missing: sys.exit(f"docs check failed: pages not rendered: {missing}")
    problems = check(site, titles, chromium, Path(a.screenshot) if a.screenshot else site / "index.png",
                     Path(a.math_screenshot) if a.math_screenshot else site / "math.png")
    problems = source + [f"broken link: {l}" for l in links] + problems
    if problems: sys.exit("docs check failed:\n  " + "\n  ".join(problems))
    print(f"docs check: {len(titles)} pages passed (formulas rendered by KaTeX {katex_version()}, served locally)")


if __name__ == "__main__":
    main()
