"""Checks of the built HTML book in _build/html: run by `make book` after the build
(`pytest -m book`), not by `make test`, which does not build the book.

Every page listed in _toc.yml must exist, every internal link must resolve, every
image must be a real file, and, where Debian's `chromium` is installed, every page must
render in headless Chromium with its figures visible."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])


def _toc_pages():
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [HTML / (f + ".html") for f in files]


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def pages():
    if not (HTML / "index.html").is_file():
        pytest.fail("No built book in _build/html; run `make book` first.")
    return _toc_pages()


def test_every_page_was_built(pages):
    missing = [str(p.relative_to(HTML)) for p in pages if not p.is_file()]
    assert not missing


def test_no_internal_link_is_broken(pages):
    broken = []
    for path in pages:
        page = _parse(path)
        for href in page.links:
            url = urlparse(href)
            if url.scheme or href.startswith(("mailto:", "javascript:")):
                continue
            target = path if not url.path else (path.parent / unquote(url.path)).resolve()
            if not target.exists():
                broken.append(f"{path.name}: {href}")
            elif url.fragment and target.suffix == ".html":
                if url.fragment not in _parse(target).ids:
                    broken.append(f"{path.name}: {href} (no such anchor)")
    assert not broken, "\n".join(broken)


def test_every_image_exists(pages):
    bad = []
    for path in pages:
        for src in _parse(path).images:
            if urlparse(src).scheme or src.startswith("data:"):
                continue
            f = (path.parent / unquote(src)).resolve()
            if not f.is_file() or f.stat().st_size < 100:
                bad.append(f"{path.name}: {src}")
    assert not bad, "\n".join(bad)


def test_chapters_show_their_figures(pages):
    for path in pages:
        if "notebooks" not in path.parts:
            continue
        source = ROOT / "notebooks" / (path.stem + ".ipynb")
        figures_in_source = source.read_text().count('"image/png"')
        assert len([s for s in _parse(path).images if "_images" in s]) >= figures_in_source, path


_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


# Appended to a copy of each page: once everything has loaded, record on <body> how
# many of the book's own images there are and how many the browser decoded, and how
# many figures (cell outputs and figure blocks) there are and how many are laid out. Remote
# images (the Colab badge) need a network and are left out.
_PROBE = """<script>window.addEventListener("load", () => {
  const local = [...document.images].filter(i => !/^https?:/.test(i.getAttribute("src")));
  const figures = local.filter(i => i.closest(".cell_output, figure"));
  const b = document.body;
  b.setAttribute("data-images", local.length);
  b.setAttribute("data-decoded", local.filter(i => i.complete && i.naturalWidth > 0).length);
  b.setAttribute("data-figures", figures.length);
  b.setAttribute("data-shown", figures.filter(i => i.getBoundingClientRect().width > 50).length);
});</script>"""


def _chromium(*args, user_dir):
    return subprocess.run(["chromium", *_CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_pages_render_in_headless_chromium(pages, tmp_path):
    from PIL import Image, ImageStat

    for path in pages:
        probe = path.with_name(".probe-" + path.name)
        probe.write_text(path.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"))
        try:
            dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
                            user_dir=tmp_path / "u").stdout
        finally:
            probe.unlink()
        assert re.search(r'<main[^>]*id="main-content"', dom), f"{path.name} did not render"
        counts = dict(re.findall(r'data-(images|decoded|figures|shown)="(\d+)"', dom))
        assert len(counts) == 4, f"{path.name}: the page's scripts did not finish loading"
        assert counts["images"] == counts["decoded"], f"{path.name}: an image did not load"
        assert counts["figures"] == counts["shown"], f"{path.name}: a figure is not visible"
        shot = tmp_path / (path.stem + ".png")
        _chromium("--window-size=1280,2000", f"--screenshot={shot}", path.as_uri(),
                  user_dir=tmp_path / "u")
        stat = ImageStat.Stat(Image.open(shot).convert("L"))
        assert stat.stddev[0] > 5, f"{path.name} rendered as a blank page"


def test_formulas_render_without_a_network(pages):
    """MathJax comes from the build's _static/, never from a CDN, and it typesets: in
    headless Chromium (where installed) a page with formulas ends with MathJax elements
    and no raw TeX delimiters left."""
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for path in pages:
        text = path.read_text(encoding="utf-8")
        scripts = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', text, flags=re.I)
        assert all(not urlparse(s).scheme and "tex-chtml.js" in s for s in scripts), \
            f"{path.name}: {scripts}"
    page = next(p for p in pages if p.stem == "02_block_influence")
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
                        user_dir=Path(tmp) / "u").stdout
    assert "mjx-container" in dom, "MathJax did not typeset the formulas"


def test_the_exercise_page_shows_no_check_output(pages):
    """What the check cells print (exercise 4's layers, exercise 8's interval) would give the
    answers away: the book shows the checks' code, never their output."""
    import html
    import json

    nb = json.loads((ROOT / "notebooks" / "08_assignments.ipynb").read_text())
    page = html.unescape(re.sub(r"<[^>]+>", "", (HTML / "notebooks" / "08_assignments.html")
                                .read_text(encoding="utf-8")))
    printed = 0
    for cell in nb["cells"]:
        if "check" not in cell.get("metadata", {}).get("tags", []):
            continue
        source = "".join(cell["source"])
        for output in cell.get("outputs", []):
            for line in "".join(output.get("text", "")).splitlines():
                if line.strip() and line.strip() not in source:  # not a literal of the code
                    printed += 1
                    assert line.strip() not in page, line
    assert printed >= 10  # the executed checks did print their answers
