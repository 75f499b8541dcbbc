# Entry points for developers and CI. `make test` is what CI runs (.ci/run).
BUF := .tools/node_modules/.bin/buf

.PHONY: deps run test bench soak

deps:
	bash scripts/install-deps.sh

run: deps
	cargo run --release -- serve

test: deps
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(BUF) lint
	python3 tests/helm/test_chart.py
	cargo test -- --test-threads=2

bench: deps
	cargo bench --bench lifecycle
	cargo bench --bench exec
	cargo bench --bench snapshots
	cargo bench --bench auth
	cargo bench --bench pull
	cargo bench --bench bridge
	cargo bench --bench walls
	cargo bench --bench events

# Not part of `make test`: 16 clients of mixed work for 10 minutes (SOAK_DURATION, SOAK_CLIENTS,
# SOAK_WARMUP, SOAK_SEED override); fails on errors that are not the caller's, leftovers or growth.
soak: deps
	cargo bench --bench soak
