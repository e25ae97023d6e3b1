"""Render a page in headless Chromium and read back what the browser saw.

``check_page(page, width)`` loads a copy of ``page`` (in the same folder, so that relative
image paths resolve) with a script appended that, on the window's ``load`` event, records
every ``<img>``'s ``complete``/``naturalWidth``, the document's ``scrollWidth`` against the
window's width and the outermost elements that stick out past it, in a ``<pre>`` that
``--dump-dom`` prints. ``screenshot(page, png, width, height)`` renders it to a PNG.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); without a binary the
tests that use this skip (``CHROMIUM`` is None).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(n)), None)
SKIP_REASON = ("no chromium binary on PATH: the browser checks of report.html and compare.html are skipped "
               "(Debian: apt-get install --no-install-recommends chromium)")
MARK = "specext-browser-check"

_SCRIPT = """<script>
window.addEventListener("load", function () {
  var W = window.innerWidth;
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); })
                   .map(function (i) { return i.getAttribute("src"); });
  var clipped = function (e) {  // inside a scrolling (or clipping) box: cannot widen the page
    for (var a = e.parentElement; a && a !== document.body; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== "visible") return true;
    return false;
  };
  var wide = [];
  Array.prototype.forEach.call(document.body.querySelectorAll("*"), function (e) {
    var p = e.parentElement;
    if (e.getBoundingClientRect().right > W + 1 && p && p.getBoundingClientRect().right <= W + 1 && !clipped(e))
      wide.push(e.tagName.toLowerCase() + (e.className ? "." + e.className : "") + " " +
                Math.round(e.getBoundingClientRect().right) + "px");
  });
  var r = {images: imgs.length, broken: broken, scroll_width: document.documentElement.scrollWidth,
           window_width: W, wide: wide.slice(0, 10),
           natural_widths: imgs.map(function (i) { return i.naturalWidth; })};
  var pre = document.createElement("pre");
  pre.id = "%s";
  pre.style.whiteSpace = "pre-wrap";
  pre.style.wordBreak = "break-all";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>""" % MARK


def _run(args, timeout=120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="specext-chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-extensions", "--allow-file-access-from-files", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", *args]
        env = dict(os.environ, HOME=profile)  # chromium writes its caches under $HOME
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def check_page(page: Path, width: int = 1700, height: int = 1000) -> dict:
    """What the browser saw of ``page`` at ``width`` x ``height``: ``images``, ``broken`` (the
    ``src`` of every image that did not load), ``scroll_width``, ``window_width``, ``wide``
    (the outermost elements past the window's right edge), ``natural_widths``."""
    page = Path(page)
    probe = page.with_name(f".{page.stem}-browser-check.html")
    text = page.read_text()
    probe.write_text(text.replace("</body>", _SCRIPT + "</body>") if "</body>" in text else text + _SCRIPT)
    try:
        p = _run([f"--window-size={width},{height}", "--dump-dom", probe.resolve().as_uri()])
    finally:
        probe.unlink()
    m = re.search(rf'<pre id="{MARK}"[^>]*>(.*?)</pre>', p.stdout, re.S)
    if m is None:
        raise AssertionError(f"chromium did not report on {page} (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, png: Path, width: int = 1700, height: int = 6000) -> Path:
    """``page`` rendered to ``png`` (the top ``height`` pixels at ``width``)."""
    p = _run([f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}", Path(page).resolve().as_uri()])
    if not Path(png).is_file():
        raise AssertionError(f"chromium wrote no screenshot of {page} (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return Path(png)
