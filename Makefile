# Convenience wrappers around dev.py (which needs only Python 3.10+).
PYTHON ?= python3

.PHONY: book site test setup clean
book:
	$(PYTHON) dev.py book
site:
	$(PYTHON) dev.py site
test:
	$(PYTHON) dev.py test
setup:
	$(PYTHON) dev.py setup
clean:
	rm -rf _build .pytest_cache
