# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench install clean crowded movies movie-pipelines volumes fields microscope

PAPER_TESTS := --datasets test_d075 --datasets test_d100 --datasets test_d175

# An editable install leaves the project's modules uncompiled (pip compiles those of a
# regular install); where Python may not write bytecode (PYTHONDONTWRITEBYTECODE, a
# read-only checkout) every command would compile them again, 0.25 s of a short one.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m compileall -q cli factory loaders models
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/factory build datasets.yaml --out data --overwrite
	$(VENV)/bin/factory inspect data --brief
	$(VENV)/bin/factory evaluate --detector trackpy-paper --data data $(PAPER_TESTS) --out runs/demo/trackpy-paper --overwrite --quiet
	$(VENV)/bin/factory evaluate --detector trackpy --data data $(PAPER_TESTS) --out runs/demo/trackpy --overwrite --quiet
	$(VENV)/bin/factory train --config configs/spotnet_demo.yaml --data data --out runs/demo/centroid-model --overwrite
	$(VENV)/bin/factory train --config configs/spotnet_default.yaml --data data --out runs/demo/model --overwrite
	$(VENV)/bin/factory evaluate --model runs/demo/model --data data --out runs/demo/spotnet --overwrite --quiet
	$(MAKE) --no-print-directory movie-pipelines RUNS=runs/demo MODEL=runs/demo/model
	$(VENV)/bin/factory report runs/demo --data data
	$(VENV)/bin/factory build fields.yaml --out data/fields --only field_val --only demo_field --overwrite --quiet
	$(PY) benchmarks/field_check.py --data data/fields --model runs/demo/model --stores field_val demo_field \
	  --out runs/demo/field.md --plot runs/demo/field.png

# The movie pipelines on test_movies: TrackPy tuned on movies_val for what the laser saw,
# and MODEL's exposure output (the exposure head of the default model,
# configs/spotnet_default.yaml, or a model trained on the exposure target alone,
# configs/spotnet_movies.yaml); evaluation links tracks and scores D per track.
movie-pipelines: $(STAMP)
	$(VENV)/bin/factory evaluate --detector trackpy --target exposure --tune-on movies_val --data data --datasets test_movies --out $(RUNS)/trackpy-movies --overwrite --quiet
	$(VENV)/bin/factory evaluate --model $(MODEL) --target exposure --data data --datasets test_movies --out $(RUNS)/spotnet-movies --overwrite --quiet

# The linter first (rules in pyproject.toml), then the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Crowded fields (crowded.yaml): several particles per 64 x 64 image; the networks that
# handle any number of spots are trained and evaluated on them.
CROWDED_EPOCHS ?= 3
crowded: $(STAMP)
	$(VENV)/bin/factory build crowded.yaml --out data/crowded --overwrite
	$(VENV)/bin/factory evaluate --detector trackpy --data data/crowded --out runs/crowded/trackpy --overwrite --quiet
	for m in spotnet gridnet densitynet; do \
	  $(VENV)/bin/factory train --config configs/$$m.yaml --data data/crowded --out runs/crowded/$$m-model \
	    --epochs $(CROWDED_EPOCHS) --overwrite --quiet && \
	  $(VENV)/bin/factory evaluate --model runs/crowded/$$m-model --data data/crowded --out runs/crowded/$$m --overwrite --quiet \
	  || exit 1; \
	done
	$(VENV)/bin/factory report runs/crowded --data data/crowded

# The movie part alone, on the movie sets only: SpotNet trained on movies_train for the
# exposure target alone (configs/spotnet_movies.yaml), both pipelines, the exposure head
# of the demo's default model too if `make demo` left it, and runs/movies/report.md.
MOVIE_SETS := --only movies_train --only movies_val --only test_movies
movies: $(STAMP)
	$(VENV)/bin/factory build datasets.yaml --out data $(MOVIE_SETS) --overwrite
	$(VENV)/bin/factory preview data/test_movies.h5 --out runs/movies/test_movies.png --n 6 --overwrite
	$(VENV)/bin/factory train --config configs/spotnet_movies.yaml --data data --out runs/movies/movie-model --overwrite --quiet
	$(MAKE) --no-print-directory movie-pipelines RUNS=runs/movies MODEL=runs/movies/movie-model
	if [ -f runs/demo/model/best.pt ]; then $(VENV)/bin/factory evaluate --model runs/demo/model --target exposure --data data --datasets test_movies --out runs/movies/spotnet-default --overwrite --quiet; fi
	$(VENV)/bin/factory report runs/movies --data data --datasets test_movies

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf data runs .pytest_cache

# z-stacks (volumes.yaml): TrackPy 3D tuned on volumes_val, DM-DetNet's 3D detector
# trained on volumes_train (configs/dmdetnet3d.yaml, about 12 minutes on a 2-core CPU),
# both scored on test_volumes; runs/volumes/report.md, the model in runs/volumes/model/.
volumes: $(STAMP)
	$(VENV)/bin/factory build volumes.yaml --out data/volumes --overwrite
	$(VENV)/bin/factory inspect data/volumes --brief
	$(VENV)/bin/factory evaluate --detector trackpy --tune-on volumes_val --data data/volumes --out runs/volumes/trackpy3d --overwrite --quiet
	$(VENV)/bin/factory train --config configs/dmdetnet3d.yaml --data data/volumes --out runs/volumes/model --overwrite
	$(VENV)/bin/factory evaluate --model runs/volumes/model --data data/volumes --out runs/volumes/dmdetnet3d --overwrite --quiet
	$(VENV)/bin/factory report runs/volumes --data data/volumes

# Real-size fields (fields.yaml): 256 x 256 px movies of 50 frames, about 40 blinking
# particles with D over a decade (log-uniform), and a test set like it without
# blinking (field_val 2 movies, the two test sets 8 each; about 2.5 minutes on a 2-core
# CPU).  With the demo's model (about 45 s more): the linkers and the TrackPy user
# pipeline scored per particle, the test sets also by depth (runs/fields/field_check.md),
# and one field drawn (runs/fields/field.png).
fields: $(STAMP)
	$(VENV)/bin/factory build fields.yaml --out data/fields --overwrite
	$(VENV)/bin/factory inspect data/fields --brief
	if [ -f runs/demo/model/best.pt ]; then $(PY) benchmarks/field_check.py --data data/fields --model runs/demo/model \
	  --out runs/fields/field_check.md --plot runs/fields/field.png; fi

# Your microscope (README): a recording of a microscope unlike the paper's (0.15 um
# pixels, 4 us dwell, a PMT with offset, gain and read noise), calibrated, training data
# built from the calibration, a SpotNet trained on it, and the recording tracked; then
# three held-out recordings of that microscope scored per particle against the demo's
# default model (if `make demo` left it) and the TrackPy user pipeline
# (runs/microscope/microscope_check.md).
MICRO := runs/microscope
MICRO_FLAGS := --pixel-size-um 0.15 --dwell-us 4 --line-retrace-ms 0.6
microscope: $(STAMP)
	$(PY) benchmarks/calibration_check.py --example $(MICRO)
	$(VENV)/bin/factory calibrate $(MICRO)/movie.tif --dark $(MICRO)/dark.tif $(MICRO_FLAGS) --out $(MICRO)/calibration --overwrite
	$(VENV)/bin/factory build $(MICRO)/calibration/microscope.yaml --out data/microscope --overwrite
	$(VENV)/bin/factory train --config $(MICRO)/calibration/train.yaml --data data/microscope --out $(MICRO)/model --overwrite
	$(VENV)/bin/factory track $(MICRO)/model $(MICRO)/movie.tif --out $(MICRO)/tracks --overwrite $(MICRO_FLAGS)
	$(PY) benchmarks/microscope_check.py --run $(MICRO)
