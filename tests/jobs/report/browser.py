"""A real headless Chromium (the distribution's package) for the report tests: it loads a page from a file,
runs its scripts, and hands back the DOM they built and what the page wrote to its console."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# the console lines Chromium logs with --enable-logging=stderr: level, then the message
CONSOLE = re.compile(r":(INFO|WARNING|ERROR|FATAL):CONSOLE\(\d+\)\] \"(.*)\", source: (.*)")


def find() -> tuple[str | None, str]:
    """(the browser's path, or None and why there is none)."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found, ""
    return None, (f"no Chromium on this machine ({', '.join(NAMES)} not on PATH); install the distribution's "
                  "package (Debian: apt-get install chromium-headless-shell), as scripts/test.sh does where it can")


@dataclasses.dataclass
class Loaded:
    dom: str
    console: list[tuple[str, str]]  # (level, message)
    log: str

    @property
    def errors(self) -> list[str]:
        return [message for level, message in self.console if level in ("ERROR", "FATAL")] + \
            [line for line in self.log.splitlines() if "Uncaught" in line]


def load(browser: str, page: Path, offline: bool = False, screenshot: Path | None = None,
         size: tuple[int, int] = (1280, 900)) -> Loaded:
    """Open `page` and let its scripts run (virtual time: no fixed sleep). `offline`: every network request
    fails (a proxy that is not there, and no network namespace at all where `unshare -n` is allowed)."""
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", f"--window-size={size[0]},{size[1]}",
            "--hide-scrollbars"]
    if offline:
        args += ["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    args.append(page.absolute().as_uri())
    if offline and _can_unshare_network():
        args = ["unshare", "-n", *args]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    console = [(m.group(1), m.group(2)) for m in CONSOLE.finditer(done.stderr)]
    if done.returncode != 0:
        raise AssertionError(f"the browser failed ({done.returncode}): {done.stderr[-2000:]}")
    return Loaded(done.stdout, console, done.stderr)


def _can_unshare_network() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def figure(dom: str, div_id: str) -> str:
    """The DOM of one plotly figure (its div, up to the next figure)."""
    start = dom.find(f'id="{div_id}"')
    assert start >= 0, f"no figure {div_id!r} in the page"
    end = dom.find('<div class="figure">', start)
    return dom[start:end if end > 0 else len(dom)]
