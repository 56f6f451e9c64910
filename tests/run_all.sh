#!/usr/bin/env bash
# The project's test command (README command 2 ends with it; .ci/run runs README's command verbatim).
# Fails (non-zero) on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
t0=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - t0 )) s)"; }

step "browser for the rating-page test (Debian chromium; needs root)"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null;
  else echo "not root: browser tests will be skipped"; fi
fi

step "a python an unprivileged account can run (tests/test_sandbox.py runs the sandbox as one; the venv's may be private)"
if [ "$(id -u)" = 0 ] && ! [ -x /usr/bin/python3 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi

step "notebooks and package in sync, outputs clean (nbdev-clean, nbdev-export change nothing)"
nbdev-clean
nbdev-export
if [ -n "$(git status --porcelain -- nbs imitation_nb)" ]; then
  git status --porcelain -- nbs imitation_nb; git --no-pager diff --stat -- nbs imitation_nb
  echo "FAIL: nbdev-clean/nbdev-export changed files: export and clean the notebooks, commit the result"; exit 1
fi

step "README.md in sync with nbs/index.ipynb"
imitation-nb docs --readme >/dev/null
git diff --exit-code -- README.md || { echo "FAIL: README.md is stale: run 'imitation-nb docs --readme' and commit"; exit 1; }

step "embedded models (converted once, cached)"
imitation-nb models prepare

step "nbdev-test (every notebook with its default parameters)"
nbdev-test --n-workers 2 --timing

step "pytest tests/ (end to end, fault injection, security, CLI)"
python -m pytest tests/ -q -p no:cacheprovider --durations=25

step "all tests passed in $(( $(date +%s) - t0 )) s"
