# fedsim: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo runs/demo_attack
	$(VENV)/bin/fedsim run scenarios/quickstart.toml --out runs/demo
	$(VENV)/bin/fedsim run scenarios/quickstart_attack.toml --out runs/demo_attack

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: $(STAMP)
	$(PY) benchmarks/geiping.py
	$(PY) benchmarks/gias.py --prior scenarios/priors/embedded_photos_32.pt
	$(PY) benchmarks/giml.py
	$(PY) benchmarks/attack_throughput.py --out benchmarks/results/attack_throughput_cpu.json
	$(PY) benchmarks/spear.py
	$(PY) benchmarks/spear.py --sizes --fedavg --lrs 0.01 0.1 --clients 8 --geiping-iterations 1000
	$(PY) benchmarks/spear.py --sizes --fedavg --batch-size 4 --lrs 0.01 0.1 --clients 4 --geiping-iterations 1000
	$(PY) benchmarks/spear.py --sizes --features --clients 4
	rm -rf runs/bench-defenses
	$(PY) benchmarks/defenses.py --runs runs/bench-defenses --out benchmarks/results/defenses_cpu.json
	$(PY) benchmarks/flower_overhead.py --repeats 3 --out benchmarks/results/flower_overhead_cpu.json

clean:
	rm -rf runs .pytest_cache
