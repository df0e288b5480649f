# One-command set-up: every target creates (or reuses) a virtualenv and installs gear_hf into it.
#   make demo / make test   .venv from the lock file requirements/lock.txt (exact versions, CPU-machine torch)
#   make lock               regenerate the lock from setup.py's ranges (fresh venv, newest allowed releases)
#   make test-latest        the suite in a fresh .venv-latest with the newest releases and no lock
# GPU users: override TORCH_SPEC, e.g. make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
# (the lock then constrains everything except the torch build itself).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
DEFAULT_TORCH_SPEC := torch==2.14.1 torchvision==0.29.1
TORCH_SPEC ?= $(DEFAULT_TORCH_SPEC)
EXTRAS := dev,demo
LOCK := requirements/lock.txt
# Packages that belong to a torch build (its CUDA libraries, triton): not pinned when TORCH_SPEC is overridden.
TORCH_BUILD_PACKAGES := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gear_hf-installed
PIP := -m pip --disable-pip-version-check

.PHONY: demo test test-latest install lock clean

$(STAMP): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	@if [ "$(TORCH_SPEC)" = "$(DEFAULT_TORCH_SPEC)" ]; then cp $(LOCK) $(VENV)/constraints.txt; \
	else grep -vE '$(TORCH_BUILD_PACKAGES)' $(LOCK) > $(VENV)/constraints.txt; fi
	$(PY) $(PIP) install --quiet -c $(VENV)/constraints.txt --upgrade pip
	$(PY) $(PIP) install --quiet -c $(VENV)/constraints.txt $(TORCH_SPEC)
	$(PY) $(PIP) install --quiet -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --output-dir outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The lock: what a fresh install from setup.py's ranges resolves to today, with the CPU-machine torch.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python $(PIP) install --quiet --upgrade pip
	.venv-lock/bin/python $(PIP) install --quiet $(DEFAULT_TORCH_SPEC)
	.venv-lock/bin/python $(PIP) install --quiet -e ".[$(EXTRAS)]"
	mkdir -p requirements
	{ echo "# Exact versions of a tested gear_hf environment: pip constraints for 'make install/test/demo'."; \
	  echo "# Regenerate with 'make lock' (never edit by hand). Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), extras [$(EXTRAS)], $(DEFAULT_TORCH_SPEC)."; \
	  .venv-lock/bin/python $(PIP) freeze --all --exclude-editable | sort -f; } > $(LOCK)
	rm -rf .venv-lock
	@echo "Wrote $(LOCK): $$(grep -c '==' $(LOCK)) pins."

# Newest releases allowed by setup.py, no lock: run before bumping the lock, to catch upstream drift.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python $(PIP) install --quiet --upgrade pip
	.venv-latest/bin/python $(PIP) install --quiet $(TORCH_SPEC)
	.venv-latest/bin/python $(PIP) install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	.venv-latest/bin/python $(PIP) freeze --all --exclude-editable | sort -f > .venv-latest/versions.txt
	@echo "Versions newer or other than the lock:"; \
	diff <(grep -v '^#' $(LOCK)) .venv-latest/versions.txt | grep '^>' || echo "  (none)"
	.venv-latest/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) .venv-latest .venv-lock outputs
