# The two front-door commands: `make demo` and `make test`.
# Both install what they need first (Debian packages, then a .venv with the
# project), so they work on a fresh Debian 12 machine as root.

SHELL := /bin/bash
VENV := .venv
# The venv's interpreter: Debian's own python3 where there is one. Its build
# runs the imgchain tools with about a fifth fewer instructions than a plain
# source build (such as pyenv's, which may come first on PATH), and most of a
# small `imgchain info` is the interpreter starting and importing.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
                fio qemu-utils qemu-system-common e2fsprogs

.PHONY: setup system-packages venv bytecode demo test clean

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

# The project installs editable in setuptools' compat mode: a plain .pth line putting this tree's
# root on sys.path (imgchain/__init__.py finds formats/, fuse/ and cli/ from there). The default
# mode's import hook costs every interpreter of .venv about 12 ms at start (pathlib and all it
# imports). New modules need no new install either way. Setuptools warns that compat mode is
# transitional; should a release drop it, the second line installs in the default mode.
# The setuptools that venv puts in .venv goes: builds take theirs from pip's isolated build
# environment, and its distutils-precedence.pth hook costs every interpreter about 1 ms at start.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip uninstall -q -y setuptools
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test]' \
		|| $(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Bytecode for every module, kept up to date (compileall skips what is current):
# with PYTHONDONTWRITEBYTECODE set, each imgchain process would compile its
# sources again at start.
bytecode: venv
	$(PY) -m compileall -q imgchain formats cli fuse tests bench >/dev/null

setup: system-packages venv bytecode

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m imgchain.cli.demo demo-work

test: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) demo-work *.egg-info
