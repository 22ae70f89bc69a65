"""Check that nothing on the documentation site is cut off at 1280 and 800 px wide.

Usage, from the project's root: ``python .ci/docs_widths.py [-v]`` (needs the ``docs``
extra and Chromium on the PATH: ``apt-get install -y chromium``); about 20 s on two
cores. It builds the site into a temporary folder, adds a small measuring script to
each page of that build, serves it on 127.0.0.1 (a free port) and, in one headless
Chromium per width, opens every page in an iframe 1280 and then 800 px wide (an iframe
is a viewport of its own: Material's media queries see its width, and its classic
scrollbar takes 15 px as a window's does). The script waits for Material's own
script, which wraps each table in its scrolling ``.md-typeset__scrollwrap``, opens
every ``<details>`` and measures, in the content column (``.md-content``), every
table, code block (``pre``) and display formula (``math[display=block]``):

- *clipped*: the element, or an ancestor below the column, hides overflow
  (``overflow-x: hidden`` or ``clip``) and part of the element lies outside that box.
  A reader cannot reach that part.
- *outside the column*: the element, or the outermost scroll container that holds
  it, reaches past the left or right edge of the content column (over the sidebar,
  or off the window at 800 px).
- *scrolls*: part of the element lies outside the visible box of a scroll container
  (``overflow-x: auto`` or ``scroll``): Material's table wrapper, the ``code`` of a
  code block (a line wider than the block), the box of a display formula. The reader
  reaches it by scrolling sideways; the report gives how far.

A page fails when anything on it is clipped or outside the column, at either width,
or when anything scrolls at 1280 px: at desktop width a reader should not need a
sideways scrollbar, least of all under a long table whose scrollbar is far below its
cut-off right edge. At 800 px scrolling is allowed: tables and formulas that scroll
are listed, code blocks counted (``-v`` lists them too). A page wider than the window
fails. One pixel of rounding is allowed everywhere.

Prints a line per page and the details, and exits with status 1 when a page fails
(2 when Chromium is missing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import html
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parent.parent
WIDTHS = (1280, 800)
STRICT_WIDTH = 1280  # at this width anything that scrolls sideways fails
REPORT_ID = "width-report"
TIMEOUT_S = 150  # for all pages at one width; a run takes about 20 s on two cores

# Runs in each page of the temporary build; writes its findings, as JSON, into a
# hidden <pre id="width-report">, which the harness below reads.
MEASURE_JS = r"""
(() => {
  const EPS = 1;
  const name = (el) => el.tagName.toLowerCase() + [...el.classList].map((c) => "." + c).join("");
  const ovx = (el) => getComputedStyle(el).overflowX;
  const scrolling = (o) => o === "auto" || o === "scroll";
  const hiding = (o) => o === "hidden" || o === "clip";
  const clip = (s, n) => (s.length > n ? s.slice(0, n - 1) + "\u2026" : s);
  const visibleBox = (el) => {
    const left = el.getBoundingClientRect().left + el.clientLeft;
    return { left, right: left + el.clientWidth };
  };
  const extent = (el) => {  // the element and everything it shows
    let { left, right } = el.getBoundingClientRect();
    const parts = { TABLE: "th, td", math: "*" }[el.tagName];
    if (parts) {
      for (const cell of el.querySelectorAll(parts)) {
        if (!cell.getClientRects().length) continue;  // not rendered (a TeX annotation)
        const r = cell.getBoundingClientRect();
        left = Math.min(left, r.left);
        right = Math.max(right, r.right);
      }
    }
    return { left, right };
  };
  const label = (el) => {
    if (el.tagName === "TABLE") {
      const row = el.querySelector("tr");
      const head = row ? [...row.cells].map((c) => c.textContent.trim()).join(" | ") : "";
      return "table \"" + clip(head, 60) + "\"";
    }
    if (el.tagName === "PRE") {
      const lines = el.textContent.replace(/\n$/, "").split("\n");
      let k = 0;
      lines.forEach((line, i) => { if (line.length > lines[k].length) k = i; });
      return "code block, longest line " + (k + 1) + " (" + lines[k].length + " chars): "
        + "\"" + clip(lines[k].trim(), 60) + "\"";
    }
    const tex = el.querySelector("annotation");
    return "formula \"" + clip((tex ? tex.textContent : el.textContent).trim(), 60) + "\"";
  };

  function measure(el, column) {
    const found = { clipped: [], scrolls: 0, scroller: "", outside: 0 };
    // The element's own overflow: a code block scrolls inside its <code>.
    const own = [el, ...[...el.children].filter((c) => c.tagName === "CODE")];
    for (const box of own) {
      const excess = box.scrollWidth - box.clientWidth;
      if (excess <= EPS) continue;
      if (scrolling(ovx(box))) {
        if (excess > found.scrolls) { found.scrolls = excess; found.scroller = name(box); }
      } else if (hiding(ovx(box))) {
        found.clipped.push(name(box) + " hides " + excess + " px");
      }
    }
    // Its ancestors up to the content column.
    let box = extent(el);
    for (let a = el.parentElement; a && a !== column; a = a.parentElement) {
      const o = ovx(a);
      if (!scrolling(o) && !hiding(o)) continue;
      const v = visibleBox(a);
      const over = Math.round(Math.max(box.right - v.right, v.left - box.left));
      if (scrolling(o)) {
        if (over > EPS && over > found.scrolls) { found.scrolls = over; found.scroller = name(a); }
        box = a.getBoundingClientRect();  // reachable inside; the scroller itself must fit
      } else if (over > EPS) {
        found.clipped.push(name(a) + " hides " + over + " px");
        box = { left: Math.max(box.left, v.left), right: Math.min(box.right, v.right) };
      }
    }
    const c = column.getBoundingClientRect();
    found.outside = Math.round(Math.max(box.right - c.right, c.left - box.left, 0));
    if (found.outside <= EPS) found.outside = 0;
    return found;
  }

  function findings() {
    const column = document.querySelector(".md-content") || document.body;
    const items = [];
    const counts = {};
    for (const el of column.querySelectorAll("table, pre, math[display=block]")) {
      const kind = el.tagName === "TABLE" ? "table" : el.tagName === "PRE" ? "code" : "math";
      counts[kind] = (counts[kind] || 0) + 1;
      if (!el.getClientRects().length) continue;  // not rendered
      const m = measure(el, column);
      if (m.clipped.length || m.scrolls || m.outside) items.push({ kind, label: label(el), ...m });
    }
    const page = document.documentElement.scrollWidth - document.documentElement.clientWidth;
    return { counts, items, pageExcess: page > EPS ? page : 0 };
  }

  function report() {
    let result;
    try {
      result = findings();
    } catch (e) {
      result = { error: "the measuring script failed: " + e };
    }
    const out = document.createElement("pre");
    out.id = "__REPORT_ID__";
    out.hidden = true;
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
  }

  // Material's script wraps each table in its scroll container; measure once every
  // table has one (at the latest 2 s after the load event) and the fonts are in.
  let waited = 0;
  const settle = () => {
    const bare = [...document.querySelectorAll(".md-content table")]
      .some((t) => !t.closest(".md-typeset__scrollwrap"));
    if (bare && waited < 2000) { waited += 100; setTimeout(settle, 100); return; }
    document.querySelectorAll("details").forEach((d) => { d.open = true; });
    document.fonts.ready.then(() => requestAnimationFrame(() => setTimeout(report, 0)));
  };
  if (document.readyState === "complete") settle();
  else window.addEventListener("load", settle);
})();
""".replace("__REPORT_ID__", REPORT_ID)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_site(site: pathlib.Path) -> list[str]:
    """Build the site into `site`, add the measuring script to each page, return the pages."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "-q", "--site-dir", str(site)]
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        sys.exit("docs_widths: mkdocs build failed")
    pages = []
    tag = "<script>" + MEASURE_JS + "</script>"
    for path in sorted(site.rglob("index.html")):
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("</body>", tag + "</body>", 1), encoding="utf-8")
        pages.append(path.parent.relative_to(site).as_posix() + "/" if path.parent != site else "")
    return pages


@contextlib.contextmanager
def serve(site: pathlib.Path):
    """Serve `site` on 127.0.0.1 at a free port; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# One Chromium per width: this page opens the pages one after another in an iframe
# of that width (an iframe is a viewport of its own: Material's media queries and the
# page's scrollbar see the iframe's width) and collects their reports.
HARNESS = """<!doctype html>
<html><body><pre id="all-reports"></pre><script>
const pages = __PAGES__, width = +location.hash.slice(1), reports = {};
let i = 0;
function next() {
  if (i === pages.length) {
    document.getElementById("all-reports").textContent = JSON.stringify(reports);
    return;
  }
  const page = pages[i], frame = document.createElement("iframe");
  frame.style.cssText = `width: ${width}px; height: 1000px; border: 0`;
  frame.src = "/" + page;
  document.body.appendChild(frame);
  const poll = () => {
    const found = frame.contentDocument && frame.contentDocument.getElementById("__REPORT_ID__");
    if (found) {
      reports[page] = JSON.parse(found.textContent);
      frame.remove();
      i += 1;
      next();
    } else {
      setTimeout(poll, 50);
    }
  };
  poll();
}
next();
</script></body></html>
""".replace("__REPORT_ID__", REPORT_ID)


def measure(chromium: str, url: str, width: int, profile: str) -> dict:
    """The reports of all pages at one width, by page."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # Virtual time, which runs ahead while a page loads: the run ends as soon as
        # the harness has nothing left to do, long before this budget.
        "--virtual-time-budget=36000000",
        f"--window-size={width + 100},1000",
        "--dump-dom",
        f"{url}#{width}",
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sys.exit(f"docs_widths: Chromium did not finish the pages at {width} px in {TIMEOUT_S} s")
    match = re.search(r'<pre id="all-reports">(.*?)</pre>', result.stdout, re.S)
    if not match or not match.group(1):
        sys.exit(f"docs_widths: no report from Chromium at {width} px: {result.stderr[-2000:]}")
    return json.loads(html.unescape(match.group(1)))


def verdicts(report: dict, width: int) -> tuple[list[str], list[dict]]:
    """The failures (lines of text) and the elements that scroll, of one page at one width."""
    if "error" in report:
        return [report["error"]], []
    failures, scrolls = [], []
    if report["pageExcess"]:
        failures.append(f"the page is {report['pageExcess']} px wider than the window")
    for item in report["items"]:
        for clipped in item["clipped"]:
            failures.append(f"{item['label']}: clipped ({clipped})")
        if item["outside"]:
            failures.append(f"{item['label']}: {item['outside']} px outside the content column")
        if item["scrolls"]:
            if width >= STRICT_WIDTH:
                failures.append(f"{item['label']}: {scroll_text(item)}")
            else:
                scrolls.append(item)
    return failures, scrolls


def scroll_text(item: dict) -> str:
    return f"scrolls {item['scrolls']} px in {item['scroller']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="list every code block that scrolls"
    )
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("docs_widths: Chromium not found; install it (apt-get install -y chromium)")
        return 2
    with tempfile.TemporaryDirectory(prefix="docs-widths-") as tmp:
        site = pathlib.Path(tmp, "site")
        pages = build_site(site)
        harness = HARNESS.replace("__PAGES__", json.dumps(pages))
        (site / "__widths__.html").write_text(harness, encoding="utf-8")
        with serve(site) as base, concurrent.futures.ThreadPoolExecutor(len(WIDTHS)) as pool:
            url = base + "__widths__.html"
            futures = {
                width: pool.submit(measure, chromium, url, width, f"{tmp}/profile-{width}")
                for width in WIDTHS
            }
            by_width = {width: future.result() for width, future in futures.items()}

    print(f"{'page':26}{'measured':30}" + "".join(f"{f'{width} px':16}" for width in WIDTHS))
    failed_pages, details = 0, []
    code_scrolls = dict.fromkeys(WIDTHS, 0)
    for page in pages:
        name, cells, failed, counts = page or "/", [], False, {}
        for width in WIDTHS:
            report = by_width[width].get(page, {"error": "no report"})
            counts = report.get("counts", counts)
            failures, scrolls = verdicts(report, width)
            code_scrolls[width] += sum(item["kind"] == "code" for item in scrolls)
            for line in failures:
                details.append(f"  {name} at {width} px: FAIL {line}")
            for item in scrolls:
                if item["kind"] != "code" or args.verbose:
                    details.append(f"  {name} at {width} px: {item['label']}: {scroll_text(item)}")
            failed = failed or bool(failures)
            cells.append(
                f"FAIL ({len(failures)})"
                if failures
                else f"ok, {len(scrolls)} scroll"
                if scrolls
                else "ok"
            )
        failed_pages += failed
        seen = ", ".join(f"{counts[k]} {k}" for k in ("table", "code", "math") if k in counts)
        print(f"{name:26}{seen or '-':30}" + "".join(f"{cell:16}" for cell in cells))
    if details:
        print("\n" + "\n".join(details))
    lenient = [width for width in WIDTHS if width < STRICT_WIDTH]
    print(
        f"\n{len(pages)} pages at {' and '.join(f'{width} px' for width in WIDTHS)}: "
        f"{failed_pages} failing. Code blocks that scroll sideways (allowed): "
        + ", ".join(f"{code_scrolls[width]} at {width} px" for width in lenient)
        + ("" if args.verbose else " (-v lists them)")
    )
    return 1 if failed_pages else 0


if __name__ == "__main__":
    sys.exit(main())
