# Side-by-side benchmark: Portcullis against a Postfix before-queue proxy and a bare
# smtp-sink, measured in the same run (bench/throughput.py). Not part of `make test`.
# `make bench-memory`: gate PSS and evictions under 50,000 IPv6 clients (bench/ipv6_sources.py).
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS=--quick`.
.PHONY: bench bench-memory
BENCH_ARGS ?=

bench: ## throughput against Postfix and smtp-sink (BENCH_ARGS=...)
	scripts/install-deps test bench
	$(PY) bench/throughput.py $(BENCH_ARGS)

bench-memory: ## the gate's memory and evictions under 50,000 IPv6 clients
	scripts/install-deps test bench
	$(PY) bench/ipv6_sources.py $(BENCH_ARGS)
