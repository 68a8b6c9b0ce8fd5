# Two commands on a fresh Debian 12 host (as root): `make demo` and `make test`. Each runs setup first.
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done

.PHONY: setup demo test unit lint images bench bench-smoke clean install uninstall

$(SETUP_STAMP): scripts/setup.sh pyproject.toml $(wildcard scripts/criu-patches/*.patch)
	bash scripts/setup.sh
	touch $@

setup: $(SETUP_STAMP)
	@bash scripts/setup.sh --services-only

images: setup
	bash scripts/build-images.sh

demo: setup
	bash scripts/build-images.sh busybox tomcat
	$(VENV)/bin/activator run -c config/demo.yaml

lint: setup
	$(VENV)/bin/ruff check activator tests bench
	$(VENV)/bin/mypy
	bash scripts/verify-units.sh
	haproxy -c -q -f config/haproxy/haproxy.cfg
	$(VENV)/bin/promtool check rules config/prometheus/activator-alerts.yml
	cd config/prometheus && $(abspath $(VENV))/bin/promtool test rules activator-alerts.test.yml

# tests/unit: no root, no engine, seconds; tests/engine: the real dockerd, runc and CRIU. `make test` runs both.
unit:
	$(VENV)/bin/pytest tests/unit

test: setup lint
	bash scripts/build-images.sh busybox systemd tomcat redis postgres dns
	$(VENV)/bin/pytest tests/unit tests/engine
	$(MAKE) bench-smoke

# Every bench script once with tiny counts, so none can rot (no timing is asserted: benchmarks are not tests).
bench-smoke: setup
	bash scripts/build-images.sh busybox tomcat redis postgres dns
	$(PY) bench/smoke.py

bench: setup
	bash scripts/build-images.sh busybox tomcat redis postgres dns
	$(PY) bench/coldstart.py
	$(PY) bench/warmpath.py
	$(PY) bench/pgbench.py
	$(PY) bench/network_cost.py
	$(PY) bench/scaleout.py

# A system install (not a checkout). Defaults: PREFIX=/opt/activator BINDIR=/usr/local/bin SYSCONFDIR=/etc/activator
# UNITDIR=/etc/systemd/system; PREFIX=X alone keeps everything under X; DESTDIR stages (scripts/install.sh).
install: setup
	bash scripts/install.sh install

uninstall:
	bash scripts/install.sh uninstall

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
