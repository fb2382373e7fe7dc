# vaeflow: `make run` installs into .venv, gets the data and trains the default config; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/vae-fashion-mnist.yaml
RUN_DIR ?= runs/vae-fashion-mnist
FASHION_DIR := /usr/share/datasets/fashion-mnist
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: install data run run-vq train ui server test bench bench-quantizer bench-zoo report-vq docs docs-serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,docs]'
	touch $@

# Fashion-MNIST: use local files when present; on Debian/Ubuntu without them, install the
# dataset-fashion-mnist package (needs root); otherwise the loader tries a download.
data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
	  echo "Fashion-MNIST not in $(FASHION_DIR) and apt-get unavailable: the loader will try to download it"; \
	fi

run: install data
	$(BIN)/vaeflow config validate $(CONFIG)
	$(BIN)/vaeflow run $(CONFIG)
	@echo
	@echo "MLflow UI:   make ui      (http://127.0.0.1:5000)"
	@echo "Prefect UI:  make server  (http://127.0.0.1:4200, with the MLflow UI)"
	@echo "Fetch the model: $(BIN)/vaeflow generate --model models:/vae-fashion-mnist@champion -n 64 --out samples.png"
	@echo "   or in Python: mlflow.pyfunc.load_model('models:/vae-fashion-mnist@champion').predict(images)"

# Quick demo without Prefect/MLflow: train, evaluate and render into $(RUN_DIR).
train: install data
	rm -rf $(RUN_DIR)
	$(BIN)/vaeflow train $(CONFIG) --out $(RUN_DIR)
	$(BIN)/vaeflow evaluate --model $(RUN_DIR)
	$(BIN)/vaeflow generate --model $(RUN_DIR) -n 64 --out $(RUN_DIR)/samples.png
	$(BIN)/vaeflow interpolate --model $(RUN_DIR) --out $(RUN_DIR)/interpolation.png

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

server: install
	@echo "Prefect UI on http://127.0.0.1:4200, MLflow UI on http://127.0.0.1:5000 (Ctrl-C stops both)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 & \
	  trap 'kill %1' EXIT; $(BIN)/prefect server start --host 127.0.0.1 --port 4200

test: install
	$(BIN)/python -m pytest -q

bench: install data
	$(BIN)/vaeflow bench train --out bench/train.json
	$(BIN)/vaeflow bench contention --out bench/contention.json
	$(BIN)/vaeflow bench pipeline --out bench/pipeline.json

bench-quantizer: install
	$(BIN)/vaeflow bench quantizer --out bench/quantizer.json

# The model zoo against pythae (builds pythae's own virtualenv under ~/.cache/vaeflow on first use).
bench-zoo: install data
	$(BIN)/vaeflow bench zoo --out bench/zoo.json

# The VQ-VAE-2 pipeline on Fashion-MNIST (configs/vqvae2-fashion-mnist.yaml), tracked and registered.
run-vq: install data
	$(BIN)/vaeflow run configs/vqvae2-fashion-mnist.yaml

# The VQ-VAE-2 quality report: the pipeline above, the conv VAE at the same epochs, the bars.
report-vq: install data
	$(BIN)/vaeflow bench vq-quality --out bench/vqvae2.json

# The docs site (MkDocs Material) into site/; `make docs-serve` serves it with live reload on :8000.
docs: install
	$(BIN)/mkdocs build --strict

docs-serve: install
	$(BIN)/mkdocs serve

clean:
	rm -rf runs .pytest_cache .vaeflow site
