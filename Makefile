# Shortcuts for the commands in README.md; each target shows the plain command it runs.
VENV ?= .venv
BIN := $(VENV)/bin
CLI := docker compose run --rm cli
# make run SOURCE=./sales.csv: a file of yours is mounted read-only for the upload (tools/inbox.py).
UPLOAD = $(if $(wildcard $(SOURCE)),-v "$(abspath $(SOURCE)):/upload/$(notdir $(SOURCE)):ro")

.PHONY: pipeline up deploy run status cancel output versions rollback replay resume retention component \
	test test-unit lint lock bench down clean

pipeline: up deploy run  ## Stack up, deploy every component, run the pipeline once

up:  ## On failure, the one-shot services' logs say why
	docker compose up -d --build --wait || { docker compose logs --no-log-prefix secrets setup; exit 1; }

deploy:
	$(CLI) prefect deploy --all

run:  ## make run [PIPELINE=enriched] [SOURCE=./sales.csv | s3://... | https://...]; warns if its steps are not the registered ones
	docker compose run --rm $(UPLOAD) cli python tools/pipeline.py run --pipeline $(or $(PIPELINE),main) $(if $(UPLOAD),/upload/$(notdir $(SOURCE)),$(SOURCE))

status:  ## make status RUN=<main run id>: each step, live, until the run ends
	$(CLI) python tools/status.py $(RUN)

cancel:  ## make cancel RUN=<main run id>: stops it, its steps and their containers
	$(CLI) prefect flow-run cancel $(RUN)

output:  ## make output RUN=<main run id>: the run's output.json, from either store
	$(CLI) python -m stepkit output $(RUN)

versions:  ## make versions C=subflow
	$(CLI) python tools/versions.py list $(C)

rollback:  ## make rollback C=subflow TAG=<tag from make versions>
	$(CLI) python tools/versions.py rollback $(C) $(TAG)

replay:  ## make replay RUN=<main run id>: the same input, the same component images
	$(CLI) python tools/replay.py $(RUN) --watch

resume:  ## make resume RUN=<main run id> [PIPELINE=enriched]: run it again, reusing every step it completed
	$(CLI) prefect deployment run main-flow/$(or $(PIPELINE),main) --param resume_from=$(RUN) --watch

retention:  ## make retention DAYS=30
	$(CLI) prefect deployment run retention/retention --param days=$(DAYS) --watch

component: $(BIN)/pytest  ## make component NAME=enrich [INPUTS=rows:validate,groups:subflow: a step of several inputs]
	$(BIN)/python tools/component.py $(NAME) $(if $(INPUTS),--inputs $(INPUTS))

$(BIN)/pytest: requirements-dev.lock
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-dev.lock  # the lock is whole: no resolver
	$(BIN)/pip check
	touch $@

test: lint test-unit  ## Lint, unit tests, then the e2e tests on a stack of their own
	$(BIN)/pytest -m e2e --durations=20

test-unit: $(BIN)/pytest  ## Everything but the Docker tests, in seconds
	$(BIN)/pytest -m "not e2e"

lint: $(BIN)/pytest
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lock: $(BIN)/pytest  ## Recompile every requirements.lock and requirements-dev.lock
	$(BIN)/python tools/lock.py

bench: $(BIN)/pytest  ## Every stage on a stack of its own: bench/results.json, charts, both READMEs; ARGS="--smoke" etc. into bench/partial/
	$(BIN)/python -m bench $(ARGS)

down:  ## Stop your stack; volumes (database, registry, data) stay
	docker compose down

clean:  ## Also delete your stack's volumes (database, registry, data, secrets): asks first, unless CONFIRM=1
	@[ "$(CONFIRM)" = 1 ] || { printf 'Delete the database, the registry, all pipeline data and the secrets of this stack? [y/N] '; \
		read answer; [ "$$answer" = y ]; } || { echo aborted; exit 1; }
	docker compose down -v --remove-orphans
