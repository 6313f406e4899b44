"""Golden sharding record of the paper config, and the pieces of `g2face compile` that need
no compiler (slice names, mesh, groups, the out-of-HBM message).

The record (tests/golden/paper_sharding.json) holds the partition spec of every
train-state leaf of `configs/g2face.py:paper` on an abstract data=4 x fsdp=4 mesh. A
change that alters any of them (axis rules, fsdp_min_size, a new or reshaped parameter,
the optimizer state layout) fails here until the record is regenerated on purpose:

  G2FACE_UPDATE_GOLDEN=1 pytest -q tests/test_aot_sharding.py
"""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from g2face_jax import config
from g2face_jax.tools import aot
from g2face_jax.train import sharding

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "paper_sharding.json")


@pytest.fixture(scope="module")
def paper():
  return config.load("paper")


def test_paper_sharding_matches_golden_record(paper):
  record = aot.sharding_record(paper, data=4, fsdp=4)
  if os.environ.get("G2FACE_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(record, f, indent=1, sort_keys=True)
      f.write("\n")
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert record["mesh"] == golden["mesh"] and record["batch"] == golden["batch"]
  now, then = record["leaves"], golden["leaves"]
  changed = [f"{k}: {then.get(k)} -> {now.get(k)}" for k in sorted(set(now) | set(then))
             if now.get(k) != then.get(k)]
  assert not changed, ("train-state sharding changed; if deliberate, regenerate with "
                       "G2FACE_UPDATE_GOLDEN=1 pytest -q tests/test_aot_sharding.py\n"
                       + "\n".join(changed[:40]) + f"\n({len(changed)} leaves)")


def test_golden_record_covers_every_state_leaf_and_splits_the_big_ones(paper):
  with open(GOLDEN) as f:
    leaves = json.load(f)["leaves"]
  state = aot.abstract_state(paper)
  assert len(leaves) == len(jax.tree.leaves(state))
  big = {k: v for k, v in leaves.items() if np.prod(v["shape"]) >= paper.mesh.fsdp_min_size}
  assert len(big) > 100
  for k, v in big.items():  # every big leaf with a dimension divisible by 4 is split once
    divisible = [d for d in v["shape"] if d % 4 == 0]
    assert v["spec"].count("fsdp") == (1 if divisible else 0), k
  assert all(s is None for v in leaves.values() if np.prod(v["shape"]) < paper.mesh.fsdp_min_size
             for s in v["spec"])


@pytest.mark.parametrize("name,topology,chips", [
    ("v5e-256", "v5e:16x16", 256), ("v5litepod-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8),
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v5p-128", "v5p:4x4x4", 64),
    ("v6e-64", "v6e:8x8", 64), ("v5p:4x4x20", "v5p:4x4x20", 320)])
def test_cloud_tpu_names(name, topology, chips):
  s = aot.parse_slice(name, num_slices=2)
  assert (s.topology, s.chips, s.devices) == (topology, chips, 2 * chips)


@pytest.mark.parametrize("name,message", [
    ("v5e-12", "no standard v5e slice"), ("v4-6", "no standard v4 slice"),
    ("v9-8", "unknown TPU topology"), ("v5e:2x2x2", "2 dimensions"), ("tpu", "unknown TPU")])
def test_bad_topology_names(name, message):
  with pytest.raises(ValueError, match=message):
    aot.parse_slice(name)


def test_mesh_sizes():
  assert aot.parse_mesh("data=4,fsdp=8") == (4, 8)
  assert aot.parse_mesh("fsdp=16") == (-1, 16)
  assert aot._mesh_sizes(256, 1, -1, 16) == (16, 16)
  assert aot._mesh_sizes(32, 2, 4, 8) == (4, 8)
  for args, message in [((256, 1, 4, 16), "does not match"), ((16, 1, -1, 3), "does not divide"),
                        ((32, 4, 2, 16), "multiple of the 4 slices")]:
    with pytest.raises(ValueError, match=message):
      aot._mesh_sizes(*args)
  with pytest.raises(ValueError, match="expected data=D,fsdp=F"):
    aot.parse_mesh("tensor=2")


def test_parameter_groups_add_up(tiny_config):
  mesh = AbstractMesh((2, 4), sharding.MESH_AXES)
  cfg = tiny_config.copy_and_resolve_references()
  cfg.mesh.fsdp_min_size = 64
  state, frozen = aot.abstract_state(cfg), aot.abstract_frozen(cfg)
  state_sh = sharding.state_shardings(state, mesh, cfg.mesh)
  frozen_sh = sharding.state_shardings(frozen, mesh, cfg.mesh)
  groups = aot.parameter_groups(state, state_sh, frozen, frozen_sh)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  assert sum(g["bytes"] for g in groups.values()) == nbytes(state) + nbytes(frozen)
  assert groups["frozen networks"]["bytes"] == nbytes(frozen)
  assert groups["discriminator"]["bytes"] == nbytes(state.disc_params)
  assert groups["decoder"]["bytes"] + groups["encoders"]["bytes"] == nbytes(state.params["decoder"])
  assert groups["mappers"]["bytes"] == nbytes(state.params["style_mapper"]) + nbytes(
      state.params["map_2_id"])
  # Adam keeps two moments per parameter (plus counts): about twice the trainable bytes
  trainable = nbytes(state.params) + nbytes(state.disc_params)
  assert 2 * trainable <= groups["optimizer state"]["bytes"] < 2 * trainable + 1024
  for g in groups.values():  # a split leaf holds a quarter per device, others all of it
    assert g["bytes"] / 4 <= g["bytes_per_device"] <= g["bytes"]
  assert groups["decoder"]["bytes_per_device"] < 0.5 * groups["decoder"]["bytes"]


def test_out_of_hbm_message_is_read_and_gives_a_knob():
  # the TPU compiler's refusal, as libtpu 0.0.52 words it for v5e
  err = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, "
                     "the total memory required for HLO temporaries (368.84G) exceeds available "
                     "HBM (15.75G). HLO module: jit__lambda.")
  required, available = aot._hbm_oom(err)
  assert required == int(368.84 * 2 ** 30) and available == int(15.75 * 2 ** 30)
  assert aot._hbm_oom(RuntimeError("INTERNAL: something else")) is None
  report = {"exceeded_by_bytes": required - available, "mesh": {"data": 8, "fsdp": 1},
            "batch_per_device": 8192, "global_batch": 65536, "remat": "none",
            "compute_dtype": "float32",
            "groups": {"decoder": {"bytes_per_device": 2 ** 30}}}
  hint = aot._hint(report)
  assert "by 353.09 GiB" in hint and "--global-batch 32768" in hint
  assert "--remat full" in hint and "--mesh data=4,fsdp=2" in hint
