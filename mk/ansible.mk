# Ansible roles (ansible/): wheels for the box, lint, and the molecule scenario that
# converges site.yml in a chroot and verifies the booted result with testinfra.
.PHONY: ansible-deps wheelhouse lint-ansible test-ansible lynis-ansible test-ansible-host

ANSIBLE_DIR := ansible
WHEELHOUSE := build/wheelhouse

ansible-deps: ## install Ansible, molecule and the image build tools
	scripts/install-deps ansible image

# The gate and its dependencies as wheels, built here: the box has no compiler.
wheelhouse: ## build the gate and its dependencies as wheels in build/wheelhouse
	rm -rf $(WHEELHOUSE)
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
	    $(VENV)/bin/pip wheel -q --wheel-dir $(WHEELHOUSE) ".[fast]"

lint-ansible: ansible-deps ## yamllint and ansible-lint on the roles
	cd $(ANSIBLE_DIR) && yamllint --strict . && ansible-lint --offline --profile production

# molecule: destroy, syntax, create, converge (chroot), idempotence, verify (QEMU +
# testinfra + Lynis), destroy.
test-ansible: ansible-deps wheelhouse ## molecule: converge site.yml in a chroot, boot it, verify
	cd $(ANSIBLE_DIR) && molecule test

# The same, with the Lynis audit of the booted image (slow under TCG: not in make test).
lynis-ansible: ansible-deps wheelhouse ## test-ansible with the Lynis audit of the booted image (slow)
	cd $(ANSIBLE_DIR) && PORTCULLIS_LYNIS=1 molecule test

lint: lint-ansible
EXTRA_TESTS += test-ansible

# host.yml (the gate, its firewall table and the DoS sysctls on an existing Debian 12
# host) on a plain Debian 12 VM: molecule scenario molecule/host, then the testinfra
# checks marked `host`.
test-ansible-host: ansible-deps wheelhouse ## molecule: host.yml on a plain Debian 12 VM, then the host checks
	cd $(ANSIBLE_DIR) && molecule test -s host
