.PHONY: setup test bench lint gpu-check gpu-check-dry
OUT ?= build/gpu-check
setup:        ## venv + torch + build + demo
	bash scripts/setup.sh
test:         ## build (incremental) + pytest
	bash scripts/test.sh
bench:        ## CPU benchmarks (default sizes; BENCH_ARGS=--tiny etc.), rows to bench/results/results.jsonl
	for b in bench/bench_*.py; do .venv/bin/python $$b $(BENCH_ARGS) || exit 1; done
lint:
	.venv/bin/ruff check python tests bench examples
gpu-check:    ## on a GPU machine (<= 8 min): build, doctor, CUDA tests, benches --quick into $(OUT)
	bash bench/gpu_check.sh $(OUT)
gpu-check-dry: ## gpu-check's plumbing on the CPU (< 3 min, what CI runs) into $(OUT)
	bash bench/gpu_check.sh --dry-run $(OUT)
