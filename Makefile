# Shortcuts for the commands in README.md; each target shows the plain command it runs.
VENV ?= .venv
BIN := $(VENV)/bin
CLI := docker compose run --rm cli prefect

.PHONY: pipeline up deploy run versions rollback test lint bench down clean

pipeline: up deploy run  ## Stack up, deploy every component, run the pipeline once

up:
	docker compose up -d --build --wait

deploy:
	$(CLI) deploy --all

run:
	$(CLI) deployment run main-flow/main --watch

versions:  ## make versions C=subflow
	docker compose run --rm cli python versions.py list $(C)

rollback:  ## make rollback C=subflow TAG=<tag from make versions>
	docker compose run --rm cli python versions.py rollback $(C) $(TAG)

$(BIN)/pytest: pyproject.toml subflow/requirements.txt main_flow/requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]' -r subflow/requirements.txt -r main_flow/requirements.txt
	touch $@

test: $(BIN)/pytest lint  ## Unit, config and Docker end-to-end tests
	$(BIN)/pytest

bench: $(BIN)/pytest  ## Latency, hops, throughput and redeploy time, docker vs process workers
	$(BIN)/python bench/benchmark.py

lint: $(BIN)/pytest
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

down:
	docker compose -f docker-compose.yml -f bench/compose.baseline.yml down

clean:  ## Also deletes the volumes: server database, registry, results and outputs
	docker compose -f docker-compose.yml -f bench/compose.baseline.yml down -v --remove-orphans
