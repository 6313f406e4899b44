"""The command selects the CPU itself only where nothing else can run, so that libtpu's
start-up errors never reach hosts without TPU chips."""
import os
import subprocess
import sys

from g2face_jax import platforms


def _pci_device(sysfs, name, vendor):
  folder = sysfs / "bus" / "pci" / "devices" / name
  folder.mkdir(parents=True)
  (folder / "vendor").write_text(vendor + "\n")


def test_tpu_chips_are_found_on_the_pci_bus_or_as_device_nodes(tmp_path):
  sysfs, dev = tmp_path / "sys", tmp_path / "dev"
  dev.mkdir()
  _pci_device(sysfs, "0000:00:04.0", "0x1af4")  # a virtio device
  assert not platforms.tpu_chips_present(str(sysfs), str(dev))
  _pci_device(sysfs, "0000:00:05.0", "0x1ae0")  # a Google TPU chip
  assert platforms.tpu_chips_present(str(sysfs), str(dev))
  other = tmp_path / "sys2"
  _pci_device(other, "0000:00:04.0", "0x10de")
  (dev / "accel0").write_text("")
  assert platforms.tpu_chips_present(str(other), str(dev))


def test_a_cpu_only_host_starts_jax_on_the_cpu_without_tpu_noise():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("from g2face_jax import platforms; import jax; "
          "print(platforms.only_cpu_available(), platforms.use_cpu_when_nothing_else_runs(), "
          "jax.devices()[0].platform)")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  only_cpu, selected, platform = done.stdout.split()
  assert selected == only_cpu
  if only_cpu == "True":
    assert platform == "cpu"
    assert "TPU" not in done.stderr and "libtpu" not in done.stderr, done.stderr


def test_the_users_choice_of_platforms_stands(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not platforms.use_cpu_when_nothing_else_runs()
