# The lab (vm/lab): the image booted in a network namespace of its own, on tap interfaces
# and bridges, reachable from any address of 198.18.0.0/15, a real Postfix behind it.
#   make lab [BACKEND=ADDR:PORT] [LAB_ISO=1] [GATE_CONFIG=portcullis.yaml] [DATA=build/data.img]
#   ip netns exec portcullis-lab swaks --server 192.0.2.25 --local-interface 198.18.0.7 ...
#   make lab-down
.PHONY: lab lab-down
LAB_NAME ?= portcullis-lab

lab: deps image-deps ## boot the image in a lab namespace: make lab [BACKEND=ADDR:PORT] [LAB_ISO=1] (vm/README.md)
	@test -f $(IMAGE) || $(MAKE) image
	$(PY) vm/lab --name $(LAB_NAME) up $(if $(LAB_ISO),--iso $(IMAGE_ISO),--disk $(IMAGE)) \
		$(if $(BACKEND),--backend $(BACKEND)) $(if $(GATE_CONFIG),--gate-config $(GATE_CONFIG)) \
		$(if $(DATA),--data $(DATA))

lab-down: ## remove the lab: its VM, its Postfix, its namespaces, and nothing else
	$(PY) vm/lab --name $(LAB_NAME) down
