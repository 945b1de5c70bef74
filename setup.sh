#!/usr/bin/env bash
# Sourced by test.sh and train.sh: create .venv if absent and install requirements.txt
# (first run ~3 min, torch from this machine's local files; a stamp skips pip afterwards).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  touch .venv/.installed
fi
export TOKENIZERS_PARALLELISM=false
