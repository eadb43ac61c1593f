# kiropool: `make run` to start it, `make test` to test it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install local-secrets run migrate test lint format bench simulate demo fuzz drill clean

install: $(STAMP)

# Re-installs only when a requirements file (or the client package's) changes.
$(STAMP): requirements.txt requirements-dev.txt clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# With DEBUG off nothing that touches data starts on public secrets
# (kiropool/secrets_guard.py). For this checkout, a SECRET_KEY and a Fernet key
# are generated once into var/local-secrets.env (git-ignored, mode 0600) and
# reused; SECRET_KEY and KIROPOOL_FERNET_KEYS in the environment win.
local-secrets: install
	$(BIN)/python manage.py secrets_generate --local

migrate: local-secrets
	$(BIN)/python manage.py migrate --noinput

run: migrate
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py ensure_admin
	bin/run

# A living pool in one command: seeds demo-* rows, starts the web server on
# KIROPOOL_BIND (default 127.0.0.1:8000) and plays a gateway against the API
# for DEMO_SECONDS, then prints the login, the keys and the dashboard URL.
DEMO_SECONDS ?= 180
demo: migrate
	$(BIN)/python manage.py demo --duration $(DEMO_SECONDS)

test: install
	$(BIN)/python -m pytest

# Part of `make test`; alone, with their figures. fuzz: schemathesis against a
# real server on the PostgreSQL test database (needs DATABASE_URL=postgres://...).
# drill: fault drills on a private PostgreSQL cluster and redis-server they start.
fuzz: install
	$(BIN)/python -m pytest tests/fuzz -m fuzz -p no:cacheprovider

drill: install
	$(BIN)/python -m pytest tests/drills -m drill -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A benchmark, not a test: kiropool (granian, 4 workers) against a minimal
# DRF floor on PostgreSQL, closed and open loop, pool sizes, bounded waiting;
# one table of figures and targets, and bench/out/bench.json.
# BENCH_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/kiropool_bench)
# is dropped and recreated; BENCH_SECONDS sets each phase's length (default 20).
# PROFILE=1 (or BENCH_PROFILE=1): py-spy flame graph of one worker into bench/out/.
# BENCH_ONLY=open_loop,wake: only those phases (floor, throughput, pool_size,
# open_loop, wake, waiting); the table shows the others as not run.
bench: local-secrets
	$(BIN)/python -m bench.load $(if $(filter-out 0,$(PROFILE)),--profile)

# Fairness simulator: every policy on one seeded simulated day (or on a trace
# from `manage.py export_trace`: make simulate TRACE=file); no server, no database.
# Writes bench/out/fairness.json, fairness-details.json, upkeep-details.json and PNG plots.
simulate: install
	$(BIN)/python -m bench.simulate $(if $(TRACE),--trace $(TRACE))

# Keeps var/local-secrets.env: a database elsewhere (DATABASE_URL) may hold
# credentials only its Fernet key can read.
clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache
	find var -mindepth 1 -maxdepth 1 ! -name local-secrets.env -exec rm -rf {} + 2>/dev/null || true
