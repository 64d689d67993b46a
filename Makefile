# One set-up for users and CI: a local .venv with torch 2.13.0 (CPU, installed first so nothing pulls a CUDA
# build) and all seven distributions installed editable with their test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mq-installed
DEMO_OUT ?= mq-out
PACKAGES := -e ".[test]" \
	-e "plugins/mq_trt[test]" -e "plugins/mq_snpe[test]" -e "plugins/mq_tvm[test]" \
	-e "plugins/mq_openvino[test]" -e "plugins/mq_tengine[test]" -e "plugins/mq_algos[test]"

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/*/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet $(PACKAGES)
	touch $(STAMP)

demo: setup
	$(BIN)/mq quantize --out $(DEMO_OUT)

# One pytest worker per core (pytest-xdist; `make test TEST_WORKERS=1` for one), each with one torch thread so
# workers do not fight over the cores. loadfile keeps a test file on one worker, so module fixtures (trained
# models, exports) are built once.
TEST_WORKERS ?= auto
test: setup
	@OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
