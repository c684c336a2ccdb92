# The two commands of the README. Both set themselves up on a fresh machine.
.PHONY: demo test setup lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/prism demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
