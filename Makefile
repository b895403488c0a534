# fasttangent: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
FASHION = /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: test test-all demo bench data-deps clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST is real data these machines can have offline (Debian package).
data-deps:
	@test -f $(FASHION) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || echo "warning: could not install dataset-fashion-mnist; its tests will skip"; \
	  else echo "note: run 'apt-get install dataset-fashion-mnist' as root for the Fashion-MNIST tests"; fi; }

test: $(STAMP) data-deps
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-all: $(STAMP) data-deps
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(VENV)/bin/fasttangent reproduce yinyang --out runs/yinyang

# nngeometry 0.4 is the second baseline; --no-deps keeps the installed torch
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps nngeometry==0.4
	$(PY) bench/ntk_gram.py --cap-seconds 240 --repeats 3

clean:
	rm -rf $(VENV) build *.egg-info runs
