# Coverage-guided fuzzing with atheris (tests/fuzz/): the sans-IO SMTP core, the parsers
# of what peers send, and the configuration loader.
#   make fuzz                       each target for FUZZ_SECONDS (60) seconds
# New inputs go to build/fuzz/<target>; tests/fuzz/corpus/<target> holds the seeds.
# A failing input is saved as build/fuzz/crash-*; the target's log is build/fuzz/<target>.log.
.PHONY: fuzz test-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := smtp_core parsers config

fuzz: deps ## fuzz the SMTP core, parsers and config loader (FUZZ_SECONDS=60 each)
	@for target in $(FUZZ_TARGETS); do \
	    mkdir -p build/fuzz/$$target; \
	    if $(PY) tests/fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_SECONDS) \
	            -artifact_prefix=build/fuzz/ build/fuzz/$$target tests/fuzz/corpus/$$target \
	            > build/fuzz/$$target.log 2>&1; then \
	        echo "fuzz $$target: $$(grep -h '^Done' build/fuzz/$$target.log), clean"; \
	    else \
	        tail -40 build/fuzz/$$target.log; echo "fuzz $$target: FAILED" >&2; exit 1; \
	    fi; \
	done

test-fuzz: fuzz ## the fuzzers, as part of make test

EXTRA_TESTS += test-fuzz
