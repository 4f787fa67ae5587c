# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench install clean crowded

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/factory build datasets.yaml --out data --overwrite
	$(VENV)/bin/factory inspect data --brief
	$(VENV)/bin/factory evaluate --detector trackpy-paper --data data --out runs/demo/trackpy-paper --quiet
	$(VENV)/bin/factory evaluate --detector trackpy --data data --out runs/demo/trackpy --quiet
	$(VENV)/bin/factory train --config configs/spotnet_demo.yaml --data data --out runs/demo/model --overwrite
	$(VENV)/bin/factory evaluate --model runs/demo/model --data data --out runs/demo/spotnet --quiet
	$(VENV)/bin/factory report runs/demo --data data

test: $(STAMP)
	$(PY) -m pytest -q

# Crowded fields (crowded.yaml): several particles per 64 x 64 image; the networks that
# handle any number of spots are trained and evaluated on them.
CROWDED_EPOCHS ?= 3
crowded: $(STAMP)
	$(VENV)/bin/factory build crowded.yaml --out data/crowded --overwrite
	$(VENV)/bin/factory evaluate --detector trackpy --data data/crowded --out runs/crowded/trackpy --quiet
	for m in spotnet gridnet densitynet; do \
	  $(VENV)/bin/factory train --config configs/$$m.yaml --data data/crowded --out runs/crowded/$$m-model \
	    --epochs $(CROWDED_EPOCHS) --overwrite --quiet && \
	  $(VENV)/bin/factory evaluate --model runs/crowded/$$m-model --data data/crowded --out runs/crowded/$$m --quiet \
	  || exit 1; \
	done
	$(VENV)/bin/factory report runs/crowded --data data/crowded

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf data runs .pytest_cache
