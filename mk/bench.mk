# Side-by-side benchmark: Portcullis against a Postfix before-queue proxy and a bare
# smtp-sink, measured in the same run (bench/throughput.py). Not part of `make test`.
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS=--quick`.
.PHONY: bench
BENCH_ARGS ?=

bench:
	scripts/install-deps test bench
	$(PY) bench/throughput.py $(BENCH_ARGS)
