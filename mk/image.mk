# The appliance image (vm/, packer/): build it, make seed disks, try it, test it end to end.
#   make image                      build/portcullis-VERSION.qcow2 and .iso, build/SHA256SUMS
#   make seed CONFIG=site.yaml      a seed disk (SEED=build/seed.iso by default)
#   make data-disk                  a data disk for the gate's state (DATA=build/data.img by default)
#   make run BACKEND=host:port SEED=build/seed.iso [DATA=build/data.img]   the image in QEMU, port 25 on SMTP_PORT
#   make verify                     boot the image, run the testinfra suite (tests/image)
#   make box                        a Vagrant box (libvirt) from the qcow2
.PHONY: image image-deps seed data-disk run verify box test-image

IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE := build/portcullis-$(IMAGE_VERSION).qcow2
IMAGE_ISO := build/portcullis-$(IMAGE_VERSION).iso
SEED ?= build/seed.iso
DATA ?=
DATA_SIZE ?= 256M
DATA_LABEL := PORTCULLIS-DATA
SMTP_PORT ?= 2525
SSH_PORT ?= 2222

image-deps: ## install the image build tools
	scripts/install-deps image ansible

image: image-deps wheelhouse ## build build/portcullis-VERSION.qcow2, .iso and SHA256SUMS
	vm/build-image

seed: ## a seed disk: make seed CONFIG=site.yaml [SEED=build/seed.iso]
	@test -n "$(CONFIG)" || { echo "usage: make seed CONFIG=site.yaml [SEED=$(SEED)]" >&2; exit 2; }
	$(PY) scripts/make-seed $(CONFIG) $(SEED)

# The gate's state (bans, reputation, the generated TLS pair) on a disk of its own, kept
# across reboots and image upgrades: an ext4 filesystem labelled PORTCULLIS-DATA. A sparse
# raw image; attach it to the VM as a disk. Never overwrites one (it holds state).
data-disk: ## a data disk for the gate's state: make data-disk [DATA=build/data.img] [DATA_SIZE=256M]
	@out="$(or $(DATA),build/data.img)"; \
	if [ -e "$$out" ]; then echo "$$out exists (it may hold the gate's state): remove it first" >&2; exit 2; fi; \
	mkdir -p "$$(dirname "$$out")" && truncate -s $(DATA_SIZE) "$$out.tmp" && \
	mkfs.ext4 -q -F -L $(DATA_LABEL) -E lazy_itable_init=0,lazy_journal_init=0 "$$out.tmp" && \
	mv "$$out.tmp" "$$out" && echo "$$out: ext4, label $(DATA_LABEL), $(DATA_SIZE): make run ... DATA=$$out"

run: ## boot the image in QEMU: make run BACKEND=host:port SEED=build/seed.iso [DATA=build/data.img]
	@test -n "$(BACKEND)" || { echo "usage: make run BACKEND=host:port SEED=$(SEED)" >&2; exit 2; }
	@test -f $(IMAGE) || { echo "no $(IMAGE): run make image first" >&2; exit 2; }
	@test -f $(SEED) || { echo "no seed $(SEED): make seed CONFIG=site.yaml first" >&2; exit 2; }
	@test -z "$(DATA)" || test -f "$(DATA)" || { echo "no data disk $(DATA): make data-disk DATA=$(DATA) first" >&2; exit 2; }
	@echo "Booting $(IMAGE) (writes are discarded at exit$(if $(DATA), except to the data disk $(DATA),; no DATA: the gate's state is on tmpfs)). Once the console shows the login prompt:"
	@echo "  SMTP: swaks --server 127.0.0.1:$(SMTP_PORT) --to someone@your.domain"
	@echo "  SSH:  ssh -p $(SSH_PORT) admin@127.0.0.1   (a key from the seed's admin_keys)"
	@echo "  The appliance sees the mail server $(BACKEND) as 10.0.2.100:25: list that in backend.servers."
	@echo "  Quit QEMU with Ctrl-A X."
	vm/boot --disk $(IMAGE) --snapshot --seed $(SEED) --backend $(BACKEND) \
		--smtp-port $(SMTP_PORT) --ssh-port $(SSH_PORT) $(if $(DATA),--data $(DATA))

verify: image-deps ## boot the image and run the testinfra suite (tests/image)
	$(PY) -m pytest -q -s tests/e2e/test_appliance.py -k "banner or hardening"

box: ## a Vagrant box (libvirt) from the qcow2
	scripts/make-box $(IMAGE) build/portcullis-$(IMAGE_VERSION)-libvirt.box

# End to end: the image built from scratch, booted with a seed, in front of a real Postfix.
test-image: image ## build the image from scratch and run the end-to-end tests
	$(PY) -m pytest -q tests/e2e

EXTRA_TESTS += test-image
