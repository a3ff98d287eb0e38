"""Driving the editor in a real headless browser: the machinery shared by the browser test
(tests/test_editor_browser.py) and the README screenshot (tools/editor_screenshot.py).

The browser is the system's Chromium (Debian's `chromium` and `chromium-driver` packages), driven
through Selenium with the driver given explicitly, so nothing is downloaded: Selenium's own driver
manager is never asked, and its usage statistics are off.
"""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (this file is in tools/)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
# Headless, no GPU, no sandbox (containers run as root), and no traffic of the browser's own.
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-default-apps", "--disable-sync", "--metrics-recording-only")


class BrowserUnavailable(RuntimeError):
    """No usable headless browser here (the reason, one line)."""


def find_browser():
    """(browser path, driver path); raises BrowserUnavailable saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise BrowserUnavailable("the Python package selenium is not installed (pip install -r requirements.txt)") \
            from None
    browser = next((shutil.which(n) for n in BROWSER_NAMES if shutil.which(n)), None)
    driver = next((shutil.which(n) for n in DRIVER_NAMES if shutil.which(n)), None)
    if browser is None or driver is None:
        missing = " and ".join(p for p, path in (("chromium", browser), ("chromium-driver", driver)) if path is None)
        raise BrowserUnavailable(f"no {missing} on this machine (as root: apt-get install -y chromium chromium-driver)")
    return browser, driver


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def editor_server(args, timeout=120, env=None):
    """Start `python editor.py ARGS --port P` on a free loopback port; yields its base URL.

    The server's output goes to a temporary log whose tail is in the error when it does not come up.
    """
    with editor_process(args, timeout, env) as (url, _):
        yield url


@contextlib.contextmanager
def editor_process(args, timeout=120, env=None):
    """editor_server, yielding (base URL, the server's subprocess.Popen) (tests read its memory)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="cnerf_editor_", suffix=".log", delete=False)
    command = [sys.executable, os.path.join(ROOT, "editor.py"), *map(str, args), "--host", "127.0.0.1",
               "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the editor exited with status {process.returncode}: {tail(log.name)}")
            try:
                with urllib.request.urlopen(url + "/api/identities", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the editor did not answer within {timeout} s: {tail(log.name)}")
            time.sleep(0.25)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.remove(log.name)


def tail(path, lines=5):
    with open(path, encoding="utf-8", errors="replace") as handle:
        return " | ".join(handle.read().strip().splitlines()[-lines:])


@contextlib.contextmanager
def headless_browser(width=1400, height=1000, download_dir=None):
    """A Selenium-driven headless Chromium with a fresh profile; yields the driver."""
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium: no usage statistics
    browser, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cnerf_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    if download_dir:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                                  "download.prompt_for_download": False})
    driver = None
    try:
        try:
            driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        except Exception as error:  # the browser is there but does not start (e.g. a broken install)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BrowserUnavailable(f"{browser} did not start under {driver_path}: {first}") from None
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------------- page helpers


def render_count(driver):
    return int(driver.find_element("tag name", "body").get_attribute("data-render-count") or 0)


def wait_for(predicate, timeout=30, interval=0.05, what="the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_idle(driver, at_least, timeout=60):
    """Wait until `at_least` renders have completed and none is in flight."""
    body = driver.find_element("tag name", "body")
    wait_for(lambda: render_count(driver) >= at_least and not body.get_attribute("data-busy"), timeout,
             what=f"render {at_least}")


def set_control(driver, element_id, value):
    """Set a range / number input as a user would and fire its events."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));", element_id, str(value))


def open_editor(driver, url, timeout=60):
    driver.get(url + "/")
    wait_idle(driver, 1, timeout)
