.PHONY: setup test bench lint gpu-check
setup:        ## venv + torch + build + demo
	bash scripts/setup.sh
test:         ## build (incremental) + pytest
	bash scripts/test.sh
bench:        ## CPU benchmarks, rows appended to bench/results/results.jsonl
	for b in bench/bench_*.py; do .venv/bin/python $$b; done
lint:
	.venv/bin/ruff check python tests bench examples
gpu-check:    ## on a GPU machine: build, CUDA tests, all benchmarks into $(OUT)
	bash bench/gpu_check.sh $(OUT)
