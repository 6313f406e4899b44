"""`g2face bench`: the JSON record the tracking reads (keys and sanity, not timings)."""
import argparse
import json

import jax
import pytest

from g2face_jax import cli
from g2face_jax.tools import bench, host_memory

KEYS = {"anonymize_s_per_img", "recover_s_per_img", "batch", "device", "anonymize_img_per_s",
        "recover_img_per_s", "anonymize_compile_s", "recover_compile_s",
        "anonymize_gflop_per_img", "recover_gflop_per_img", "anonymize_gflop_per_s",
        "recover_gflop_per_s", "peak_rss_mb", "dtype", "micro_batch", "small_nets_micro_batch",
        "devices",
        "reuse_freed_memory", "huge_pages", "matmul_precision"}


def test_bench_json_on_tiny_config(capsys):
  assert cli.main(["bench", "--config", "tiny", "--batch", "1", "--rounds", "1", "--json"]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert KEYS <= set(record)
  assert record["batch"] == 1 and record["config"] == "tiny" and record["size"] == 32
  assert record["dtype"] == "float32" and record["micro_batch"] == 1 and record["devices"] == 1
  assert record["small_nets_micro_batch"] == 1
  assert record["matmul_precision"] == "float32"
  assert record["device"].startswith("cpu")
  for path in ("anonymize", "recover"):
    assert record[f"{path}_s_per_img"] > 0
    assert record[f"{path}_img_per_s"] == pytest.approx(1 / record[f"{path}_s_per_img"])
    assert record[f"{path}_gflop_per_img"] > 0
    assert record[f"{path}_gflop_per_s"] == pytest.approx(
        record[f"{path}_gflop_per_img"] / record[f"{path}_s_per_img"])
  assert record["peak_rss_mb"] > 0
  assert record["reuse_freed_memory"] is False
  assert record["huge_pages"] is host_memory.huge_pages_active()


def test_micro_batch_is_recorded_and_checked(capsys):
  assert cli.main(["bench", "--config", "tiny", "--batch", "2", "--rounds", "1",
                   "--micro-batch", "2", "--json"]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["batch"] == 2 and record["micro_batch"] == record["small_nets_micro_batch"] == 2
  assert cli.main(["bench", "--config", "tiny", "--batch", "4", "--micro-batch", "3"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--micro-batch 3" in err and "batch 4 is not a multiple of micro_batch 3" in err
  assert "\n" not in err


def test_parse_batches():
  assert bench.parse_batches("1,4") == [1, 4]
  for bad in ("", "0", "a", "2,-1"):
    with pytest.raises(ValueError, match="--batch"):
      bench.parse_batches(bad)


def test_bad_batch_is_a_one_line_error(capsys):
  assert cli.main(["bench", "--config", "tiny", "--batch", "x"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("g2face bench: error:") and "--batch" in err and "\n" not in err


TRAIN_KEYS = {"train_step_s", "train_img_per_s", "train_compile_s", "train_gflop_per_step",
              "train_gflop_per_s", "argument_mb_per_device", "temp_mb_per_device", "devices",
              "global_batch", "device", "peak_rss_mb", "reuse_freed_memory", "huge_pages"}


def test_train_bench_json_on_tiny_config(capsys):
  assert cli.main(["bench", "--train", "--config", "tiny", "--rounds", "1", "--json"]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert TRAIN_KEYS <= set(record)
  assert record["global_batch"] == 4 and record["devices"] == 1
  assert record["train_img_per_s"] == pytest.approx(4 / record["train_step_s"])
  assert record["train_gflop_per_s"] == pytest.approx(
      record["train_gflop_per_step"] / record["train_step_s"])
  assert record["train_gflop_per_step"] > 0 and record["argument_mb_per_device"] > 0


def test_bad_device_list_is_a_one_line_error(capsys):
  assert cli.main(["bench", "--train", "--config", "tiny", "--devices", "0"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--devices '0'" in err


def test_bench_bfloat16_record(capsys):
  assert cli.main(["bench", "--config", "tiny", "--rounds", "1", "--dtype", "bfloat16",
                   "--json"]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["dtype"] == "bfloat16" and KEYS <= set(record)
  assert record["anonymize_gflop_per_img"] > 0 and record["recover_s_per_img"] > 0


def test_dtype_with_train_is_a_one_line_error(capsys):
  assert cli.main(["bench", "--train", "--config", "tiny", "--dtype", "bfloat16"]) == 2
  err = capsys.readouterr().err.strip()
  assert "train.compute_dtype" in err and "\n" not in err


def test_bench_tensorfloat32_record(capsys):
  assert cli.main(["bench", "--config", "tiny", "--rounds", "1", "--matmul-precision",
                   "tensorfloat32", "--json"]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["matmul_precision"] == "tensorfloat32" and KEYS <= set(record)
  assert cli.main(["bench", "--train", "--config", "tiny", "--matmul-precision",
                   "tensorfloat32"]) == 2
  err = capsys.readouterr().err.strip()
  assert "--matmul-precision" in err and "\n" not in err


@pytest.mark.parametrize("option, seen",
                         [("float32", "highest"), ("tensorfloat32", "tensorfloat32")])
def test_commands_run_at_their_matmul_precision(option, seen):
  """--matmul-precision float32 leaves the precision to the pipeline ('highest' here,
  from conftest; 'highest' inside the pipeline anyway); tensorfloat32 sets JAX's."""
  got = []
  args = argparse.Namespace(matmul_precision=option,
                            run=lambda a: got.append(jax.config.jax_default_matmul_precision) or 0)
  assert cli._run(args) == 0 and got == [seen]
