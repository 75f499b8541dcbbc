# Entry points for developers and CI. `make test` is what CI runs (.ci/run).
BUF := .tools/node_modules/.bin/buf

.PHONY: deps run test bench

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
