# The two commands of a fresh machine: `make demo` and `make test` (README).
# The virtualenv is (re)installed only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m stages.demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The demo's trained LiDAR teacher, when there is one, makes the cache and student figures realistic.
TEACHER_ARG = $(if $(wildcard $(DEMO_OUT)/runs/lidar_teacher/model.pt),--teacher $(DEMO_OUT)/runs/lidar_teacher/model.pt)
DATAROOT_ARG = $(if $(wildcard $(DEMO_OUT)/nuscenes/v1.0-mini),--dataroot $(DEMO_OUT)/nuscenes)

bench: $(STAMP)
	$(PY) tests/bench/bench_models.py
	$(PY) tests/bench/bench_loading.py
	$(PY) tests/bench/bench_training.py $(DATAROOT_ARG) --epochs 2
	$(PY) tests/bench/bench_cache.py $(TEACHER_ARG) $(DATAROOT_ARG)
	$(PY) tests/bench/bench_student.py $(TEACHER_ARG)

clean-demo:
	rm -rf $(DEMO_OUT)
