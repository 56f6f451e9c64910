"""Issue 22: the notebooks open and run in JupyterLab. The interactive dependencies are pinned in both install paths
(pip and conda) and installed at those versions; a real JupyterLab server on loopback (token auth, random free port,
throw-away runtime/config dirs) runs a figure notebook in Chromium through Playwright."""
import importlib.metadata as md, re, tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INTERACTIVE = ("jupyterlab", "ipywidgets", "tensorboard")


def _pins(lines) -> dict:
    "{name: version} of the `name==version` requirement strings among `lines`."
    return {m[1].lower(): m[2] for l in lines if isinstance(l, str) and (m := re.fullmatch(r"\s*([\w.-]+)==([\w.]+)\s*", l))}


def test_interactive_dependencies_are_pinned_alike_and_installed():
    deps = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda_pip = _pins(next(d["pip"] for d in env if isinstance(d, dict) and "pip" in d))
    for name in INTERACTIVE:
        assert name in deps, f"pyproject.toml: {name} is not a pinned dependency"
        assert conda_pip.get(name) == deps[name], f"environment.yml pins {name}=={conda_pip.get(name)}, pyproject {deps[name]}"
        assert md.version(name) == deps[name], f"{name} {md.version(name)} installed, {deps[name]} pinned"


# ---------------------------------------------------------------------------------------------------------------------
# JupyterLab in a real browser
import json, os, secrets, socket, subprocess, sys, time, urllib.error, urllib.request

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium): "
                                    "the JupyterLab browser test needs Debian's chromium for Playwright")
SCREENSHOT = ROOT / "docs" / "jupyterlab.png"

# the notebook the browser runs: Figure 4 of the paper drawn from the paper's reported numbers by the package's own code
FIGURE_NB = {"cells": [
    {"cell_type": "markdown", "metadata": {}, "source": ["# Figure 4 from the paper's numbers\n",
                                                         "`plots.fig4_capabilities` on `core.paper_results()` (data/paper/)."]},
    {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
     "source": ["from imitation_nb.core import paper_results\n", "from imitation_nb.plots import fig4_capabilities\n",
                "paper = paper_results()\n", "len(paper)"]},
    {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
     "source": ["points, fig = fig4_capabilities(paper, source=\"paper\", save=False, return_fig=True)   # shown by the inline backend"]}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _get(url):
    "(status, location) of a GET without following redirects."
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k): return None
    try:
        r = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect).open(url, timeout=10)
        return r.status, r.headers.get("Location")
    except urllib.error.HTTPError as e: return e.code, e.headers.get("Location")
    except (urllib.error.URLError, ConnectionError): return None, None     # not listening yet


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on loopback: random free port, a token, throw-away config/runtime/settings/workspace dirs."
    root, port, token = tmp_path / "notebooks", _free_port(), secrets.token_hex(16)
    root.mkdir(); (root / "paper_figure.ipynb").write_text(json.dumps(FIGURE_NB))
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"; settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipython"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", *(["--allow-root"] if os.geteuid() == 0 else [])]
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while _get(f"{base}/api/status?token={token}")[0] != 200:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "lab.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base, token, root
    finally:
        proc.terminate()
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


def test_the_server_refuses_requests_without_the_token(lab):
    base, token, _ = lab
    assert _get(f"{base}/api/contents?token={token}")[0] == 200
    assert _get(f"{base}/api/contents")[0] == 403                        # the API: forbidden
    assert _get(f"{base}/api/contents?token=wrong{token}")[0] == 403
    status, where = _get(f"{base}/lab")                                   # the UI: sent to the login page
    assert status == 302 and where.startswith("/login"), (status, where)


@pytest.mark.browser
@needs_chromium
def test_jupyterlab_runs_a_paper_figure_notebook_in_chromium(lab, tmp_path):
    from imitation_nb.eval_human import chromium_browser
    base, token, root = lab
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{base}/lab/tree/paper_figure.ipynb?token={token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=120_000)
        page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=120_000)   # the kernel is up (status bar)
        page.locator(".jp-CodeCell .jp-InputArea-prompt").first.click()    # the notebook is the active widget
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
        img = page.wait_for_selector(".jp-OutputArea-output img", state="attached", timeout=180_000)
        page.wait_for_function("""() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                                  .every(p => /\\[\\d+\\]/.test(p.textContent))""", timeout=180_000)
        prompts = [p.strip() for p in page.locator(".jp-CodeCell .jp-InputArea-prompt").all_text_contents()]
        assert prompts == ["[1]:", "[2]:"], prompts                       # both code cells ran, in order
        assert page.locator("[data-mime-type='application/vnd.jupyter.error']").count() == 0, \
            page.locator(".jp-OutputArea-output").all_text_contents()
        img.scroll_into_view_if_needed(); box = img.bounding_box()
        assert box and box["width"] > 400 and box["height"] > 200, box     # the figure rendered, at a real size
        assert img.evaluate("i => i.complete && i.naturalWidth > 0")
        page.locator(".jp-Cell").nth(2).evaluate("e => e.scrollIntoView({block: 'start'})")   # the figure's cell on top
        page.wait_for_timeout(500)
        assert page.locator(".jp-OutputArea-output img").count() == 1      # one figure, drawn once
        out = tmp_path / "jupyterlab.png"; page.screenshot(path=str(out))
        assert out.stat().st_size > 20_000
    # docs/jupyterlab.png (README) is rewritten with IMITATION_NB_WRITE_DOCS=1, so that a test run leaves the checkout clean
    if os.environ.get("IMITATION_NB_WRITE_DOCS") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.write_bytes(out.read_bytes())                          # the README's screenshot (committed)


def test_readme_says_how_to_open_the_notebooks_and_shows_the_screenshot():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Read and run the notebooks", 1)[1].split("\n## ", 1)[0]
    assert "jupyter lab nbs/" in section and "](docs/jupyterlab.png)" in section and SCREENSHOT.exists()
    assert "`parameters`" in section and "papermill" in section
