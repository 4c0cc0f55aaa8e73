# Portcullis appliance image. Runs on Debian's Packer 1.6.6 (no `packer init`, no
# required_plugins: the qemu builder and the ansible provisioner are built in).
# vm/build-image calls it with the variables below; it is not meant to be run by hand.
#
# The input disk is already configured through a chroot (fast). Packer boots it, applies
# the part of ansible/site.yml that only a running system can do (tasks tagged `live`),
# then seals it in the shutdown command (packer/seal.sh).

variable "base_disk" {
  type        = string
  description = "qcow2 made by vm/make-disk from the chroot-configured tree"
}
variable "output_dir" {
  type = string
}
variable "accelerator" {
  type        = string
  description = "kvm or tcg, as vm/detect-accel found by a test boot"
}
variable "ssh_user" {
  type        = string
  description = "the build account, removed by the seal"
}
variable "ssh_key" {
  type = string
}
variable "ansible_extra_vars" {
  type        = string
  description = "path of a YAML file of extra variables for site.yml"
}
variable "serial_log" {
  type = string
}

locals {
  # Packer 1.6.6 would pass accel=kvm whenever /dev/kvm exists; choose it here instead,
  # with the same QEMU arguments as vm/boot (which says why TCG's are these).
  accel_args = jsondecode(file("${abspath(path.root)}/../vm/qemu-accel.json"))[var.accelerator]
}

source "qemu" "portcullis" {
  iso_url          = var.base_disk
  iso_checksum     = "none"
  disk_image       = true
  disk_size        = "2048M" # as vm/make-disk made it (Packer would grow it to 40 GiB)
  use_backing_file = false
  format           = "qcow2"
  disk_interface   = "virtio"
  disk_compression = true
  disk_discard       = "unmap"   # the seal's fstrim frees blocks in the qcow2
  disk_detect_zeroes = "unmap"
  skip_compaction  = false
  output_directory = var.output_dir
  vm_name          = "portcullis.qcow2"
  accelerator      = "none"
  memory           = 1024
  cpus             = 2
  headless         = true
  boot_wait        = "0s"
  # eth0 public (nothing forwarded), eth1 management (SSH): as vm/boot wires them.
  qemuargs = concat(local.accel_args, [
    ["-netdev", "user,id=public,restrict=on,net=10.0.2.0/24"],
    ["-device", "virtio-net-pci,netdev=public"],
    ["-netdev", "user,id=mgmt,restrict=on,net=10.0.3.0/24,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-device", "virtio-net-pci,netdev=mgmt"],
    ["-device", "virtio-rng-pci"],
    ["-serial", "file:${var.serial_log}"],
  ])
  communicator         = "ssh"
  ssh_host             = "127.0.0.1"
  ssh_username         = var.ssh_user
  ssh_private_key_file = var.ssh_key
  ssh_timeout          = "10m"
  # The seal removes the build account, so it must be the last thing done over SSH.
  shutdown_command = "sudo /usr/local/sbin/portcullis-seal"
  shutdown_timeout = "5m"
}

build {
  sources = ["source.qemu.portcullis"]

  provisioner "ansible" {
    playbook_file = "${path.root}/../ansible/site.yml"
    user          = var.ssh_user
    use_proxy     = false
    # Only the tasks tagged `live`: what a chroot cannot do. Everything else was applied
    # through the chroot already; over SSH under TCG each task costs 5-10 s.
    extra_arguments = [
      "--extra-vars", "portcullis_build_context=live",
      "--extra-vars", "@${var.ansible_extra_vars}",
      "--tags", "live",
    ]
    ansible_env_vars = [
      "ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg",
      "ANSIBLE_HOST_KEY_CHECKING=False",
    ]
  }

  provisioner "file" {
    source      = "${path.root}/seal.sh"
    destination = "/tmp/portcullis-seal"
  }

  provisioner "shell" {
    inline        = ["sudo install -m 0700 /tmp/portcullis-seal /usr/local/sbin/portcullis-seal"]
    remote_folder = "/home/${var.ssh_user}" # /tmp is noexec on the appliance
  }
}
