# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv, install what they need (Debian packages via apt-get
# when running as root and missing), then run.

# Prefer the system interpreter: domains that run under their own uids must be
# able to execute it (a pyenv under /root is closed to them).
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian packages: Xen's public headers (ABI tests compile against them), a C compiler,
# and the real programs the devices are checked with (fio's nbd engine, nbdkit,
# qemu-img, nbdinfo/nbdcopy, iperf3); gcc-multilib for the x86_32 ABI checks; the VM image's
# kernel and busybox, and QEMU (with qemu-storage-daemon) to boot it (deploy/vm/).
DEB_PACKAGES := libxen-dev xenstore-utils gcc gcc-multilib libc6-dev python3-venv fio nbdkit qemu-utils libnbd-bin iperf3 iproute2 iputils-ping linux-image-cloud-amd64 busybox-static qemu-system-x86
PYTEST_ARGS ?=

.PHONY: demo test test-fleet typecheck sysdeps venv bench clean

demo: sysdeps venv
	$(BIN)/python -m xdom.deploy.demo

test: sysdeps venv typecheck
	$(BIN)/python -m pytest -n auto $(PYTEST_ARGS)

# Many hosts (README: Many hosts): three hosts in network namespaces managed by one CLI over CurveZMQ, and the
# feature matrix run by pytest-xdist workers on those hosts through execnet, with a report of which host ran what.
test-fleet: sysdeps venv
	$(BIN)/python -m pytest -s -p no:cacheprovider $(PYTEST_ARGS) tests/test_fleet.py tests/test_fleet_matrix.py

# mypy over the checkout as it is imported (xdom/ holds symlinks to the top-level folders: see
# pyproject.toml); strict on the broker, the ABI and the xenbus state machine.
typecheck: venv
	$(BIN)/mypy

bench: sysdeps venv
	$(BIN)/python benchmarks/bench_broker.py
	$(BIN)/python benchmarks/bench_xenstored.py
	$(BIN)/python benchmarks/bench_blk.py
	$(BIN)/python benchmarks/bench_net.py
	$(BIN)/python benchmarks/bench_stall.py
	$(BIN)/python benchmarks/bench_scale.py --guests 1,4,32,100

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

sysdeps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1) || \
	      (apt-get update -qq >/dev/null && apt-get install -y -qq $$missing >/dev/null); \
	  else \
	    echo "missing Debian packages:$$missing (run as root to install them; tests needing them will fail)"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
