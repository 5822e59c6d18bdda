# xllm: `make` builds, `make run` runs the demo, `make test` runs every test.
# Each target first installs missing Debian packages (scripts/install-deps.sh).

BUILD      ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
TSAN_TESTS ?= test_threadpool test_kv test_engine test_registry_mem test_registry_etcd test_kv_transfer test_router \
              test_cluster test_serve_api test_serve_load
# Shell tests (tests/integration/*.sh) have no build target of their own: they run the xllm binary.
SH_TESTS   := $(basename $(notdir $(wildcard tests/integration/*.sh)))
FUZZ_BUILD ?= build-fuzz
JOBS       ?= $(shell nproc)
SHARED     ?= $(abspath ../shared)
FUZZ_SECONDS ?= 30
export XLLM_SHARED ?= $(SHARED)

.PHONY: all deps node-deps build run test test-unit test-asan test-tsan test-fuzz format \
        format-check clean

all: build

deps:
	@./scripts/install-deps.sh

# The official openai npm client, version pinned by tests/node/package-lock.json.
node-deps: deps
	@[ -d tests/node/node_modules/openai ] || \
	  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) -- --no-print-directory

MODEL ?= $(XLLM_SHARED)/models/stories260K/stories260K.gguf
PORT  ?= 8080

# Serves MODEL over HTTP (OpenAI API); the server prints its URL and a curl line to paste.
run: build
	./$(BUILD)/xllm serve -m $(MODEL) --port $(PORT)

test: build format-check node-deps
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory test-tsan
	$(MAKE) --no-print-directory test-fuzz

test-asan: deps node-deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DXLLM_SANITIZE=ON >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS) -- --no-print-directory
	ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS)

# ThreadSanitizer over the tests whose code runs several threads (thread pool, KV pre-mapper, engine, registry,
# router, and through the xllm binary: the HTTP server, engine instances and cluster
# services). A race makes the process exit with 66 at once (halt_on_error): a C test fails, and
# the Python tests check every server's exit status when they stop it.
test-tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS=-fsanitize=thread \
		-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS) --target $(filter-out $(SH_TESTS),$(TSAN_TESTS)) xllm
	TSAN_OPTIONS=halt_on_error=1 ctest --test-dir $(TSAN_BUILD) --output-on-failure \
		-R "^($(shell echo $(TSAN_TESTS) | tr ' ' '|'))$$"

test-fuzz: deps
	@CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=Debug -DXLLM_FUZZ=ON >/dev/null
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) -- --no-print-directory
	./scripts/run-fuzz.sh $(FUZZ_BUILD) $(FUZZ_SECONDS)

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

format-check: deps
	@clang-format --dry-run --Werror $$(git ls-files '*.c' '*.h') && echo "format-check: ok"

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)
