# Side-by-side benchmark: Portcullis against a Postfix before-queue proxy and a bare
# smtp-sink, measured in the same run (bench/throughput.py). Not part of `make test`.
# Load shapes, rounds alternating between shapes and targets: one 2 KiB message per
# session at 20 (s20) and 100 (s100) sessions, 10 messages per session (reuse), 50
# recipients per message (rcpt50), 1 MiB messages at 10 sessions (mib, also MB/s), and
# silent connections held open (idle). It prints msgs/s median (min-max), the CPU time
# per message of each target and of its relay sink, and peak memory.
# Portcullis runs twice: as shipped (SQLite store) and with reputation.store: redis on a
# private redis-server (target portcullis-redis); a table gives redis/SQLite per shape and
# the store's round trips per message, counted by redis-server (EXEC + PING, heartbeats
# included). A fifth target, the Python relay floor (bench/relay_floor.py: bytes across,
# no SMTP, no policy), shows what the gate's own work costs beyond Python's floor.
# BENCH_ARGS=--targets=portcullis,portcullis-redis runs only those two.
# BENCH_ARGS=--shapes=s20,mib runs some of them.
# `make bench-memory`: gate PSS and evictions under 50,000 IPv6 clients (bench/ipv6_sources.py).
# `make bench-fleet-memory`: bytes per tracked client in the fleet store (bench/fleet_memory.py).
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS=--quick`.
.PHONY: bench bench-memory bench-fleet-memory
BENCH_ARGS ?=

bench: ## throughput against Postfix and smtp-sink (BENCH_ARGS=...)
	scripts/install-deps test bench
	$(PY) bench/throughput.py $(BENCH_ARGS)

bench-memory: ## the gate's memory and evictions under 50,000 IPv6 clients
	scripts/install-deps test bench
	$(PY) bench/ipv6_sources.py $(BENCH_ARGS)

bench-fleet-memory: ## bytes per tracked client in the fleet's Valkey/Redis store
	scripts/install-deps test bench
	$(PY) bench/fleet_memory.py $(BENCH_ARGS)
