# Two commands on a fresh machine:
#   make demo   set up .venv, make a synthetic data set, build shards, train, evaluate
#   make test   set up .venv, lint, run the test suite (what CI runs: .ci/run)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: install system-deps browser demo test lint bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# ffmpeg decodes what libsndfile cannot (m4a, webm, opus...); installed from the OS packages when missing.
system-deps:
	@command -v ffmpeg >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing ffmpeg (apt-get)"; \
	    $$SUDO apt-get install -y -q ffmpeg >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q ffmpeg >/dev/null; }; \
	  elif command -v brew >/dev/null 2>&1; then brew install ffmpeg; \
	  else echo "please install ffmpeg with your package manager" >&2; exit 1; fi; }

install: $(STAMP) system-deps

# The report page is tested in a real headless browser (tests/test_report.py): Chromium from the OS packages.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get)"; \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; \
	  elif command -v brew >/dev/null 2>&1; then brew install --cask chromium; \
	  else echo "please install chromium with your package manager" >&2; exit 1; fi; }

$(DEMO)/raw:
	$(BIN)/audioshard demo-data $(DEMO)/raw --seconds 240

demo: install $(DEMO)/raw
	$(BIN)/audioshard build $(DEMO)/raw --out $(DEMO)/shards --quiet
	$(BIN)/audioshard info $(DEMO)/shards
	$(BIN)/audioshard train --shards $(DEMO)/shards --out $(DEMO)/run --set train.epochs=12 --quiet
	$(BIN)/audioshard evaluate --checkpoint $(DEMO)/run/best_model.pt --shards $(DEMO)/shards --split test --out $(DEMO)/eval
	@echo ""
	@echo "demo data:  $(DEMO)/raw/ (synthetic)"
	@echo "shards:     $(DEMO)/shards/ (manifest.json; see: $(BIN)/audioshard info $(DEMO)/shards)"
	@echo "run:        $(DEMO)/run/ (best_model.pt, metrics.json, val_report.txt, val_confusion_matrix.png, ...)"
	@echo "report:     $(DEMO)/run/report.html (open it in a browser)"
	@echo "test eval:  $(DEMO)/eval/ (test_report.txt, test_confusion_matrix.png, metrics.json)"

lint: install
	$(BIN)/ruff check audioshard tests tools recipes

# Two test processes (pytest-xdist), each module's tests in one so its fixtures are built once.
test: install browser
	$(BIN)/ruff check audioshard tests tools recipes
	$(BIN)/python -m pytest -q -n 2 --dist loadscope

clean-demo:
	rm -rf $(DEMO)
