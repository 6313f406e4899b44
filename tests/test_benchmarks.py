"""The benchmark scripts: argument parsing, the summary math on canned records,
the subprocess plumbing of compare_trees.py on fake trees, and official_compare.py's
plain-PyTorch stand-ins for the official CUDA ops against the JAX references."""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # as when the scripts run themselves


def _load(name):
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


compare_trees = _load("compare_trees")
official_compare = _load("official_compare")


def _tree(tmp_path, name, anonymize_s, recover_s, old_layout=False):
  """A fake source tree whose bench returns fixed per-face seconds; `old_layout`:
  g2face_jax/bench.py, as before tools/ existed."""
  tools = tmp_path / name / "g2face_jax" / ("" if old_layout else "tools")
  tools.mkdir(parents=True, exist_ok=True)
  (tmp_path / name / "g2face_jax" / "__init__.py").write_text("")
  (tools / "__init__.py").write_text("")
  (tools / "bench.py").write_text(textwrap.dedent(f"""
      def run(config, batch, rounds, dtype):
        return dict(config=config, batch=batch, rounds=rounds, dtype=dtype, device="fake",
                    anonymize_s_per_img={anonymize_s} * batch, recover_s_per_img={recover_s})
      """))
  return str(tmp_path / name)


def test_compare_trees_arguments(tmp_path):
  old, new = _tree(tmp_path, "old", 1.0, 1.0), _tree(tmp_path, "new", 1.0, 1.0)
  args = compare_trees.parse_args([old, new])
  assert (args.old_tree, args.new_tree) == (old, new)
  assert (args.config, args.batch, args.rounds, args.pairs, args.dtype) == (
      "paper", [1, 4], 3, 3, "float32")
  args = compare_trees.parse_args([old, new, "--config", "tiny", "--batch", "2", "--rounds", "5",
                                   "--pairs", "4", "--huge-pages", "--json"])
  assert (args.config, args.batch, args.rounds, args.pairs, args.huge_pages, args.json) == (
      "tiny", [2], 5, 4, True, True)
  for bad in (["--batch", "0"], ["--batch", "x"], ["--rounds", "0"], ["--pairs", "-1"]):
    with pytest.raises(SystemExit):
      compare_trees.parse_args([old, new] + bad)
  with pytest.raises(SystemExit):
    compare_trees.parse_args([old, str(tmp_path)])  # no g2face_jax/ in it


def test_compare_trees_environment_and_order():
  env = compare_trees.child_environment("/t", True, {"GLIBC_TUNABLES": "glibc.foo=1",
                                                     "PYTHONPATH": "/elsewhere"})
  assert env["PYTHONPATH"] == "/t"
  assert env["GLIBC_TUNABLES"] == "glibc.foo=1:glibc.malloc.hugetlb=1"
  again = compare_trees.child_environment("/t", True, env)
  assert again["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
  assert "GLIBC_TUNABLES" not in compare_trees.child_environment("/t", False, {})
  assert [compare_trees.order(i) for i in range(3)] == [("old", "new"), ("new", "old"),
                                                        ("old", "new")]


def test_compare_trees_summary_math():
  old_b1, new_b1 = [2.0, 2.4, 2.2], [1.0, 1.3, 1.1]
  records = [dict(tree="old", batch=1, anonymize_s_per_img=a, recover_s_per_img=a + 1)
             for a in old_b1]
  records += [dict(tree="new", batch=1, anonymize_s_per_img=a, recover_s_per_img=a + 1)
              for a in new_b1]
  records += [dict(tree="old", batch=4, anonymize_s_per_img=3.0, recover_s_per_img=3.0),
              dict(tree="new", batch=4, anonymize_s_per_img=1.5, recover_s_per_img=4.5)]
  rows = {(r["batch"], r["path"]): r for r in compare_trees.summarize(records)}
  assert sorted(rows) == [(1, "anonymize"), (1, "recover"), (4, "anonymize"), (4, "recover")]
  r = rows[1, "anonymize"]
  assert (r["old_best_s"], r["new_best_s"], r["runs"]) == (2.0, 1.0, 3)
  assert r["old_median_s"] == pytest.approx(statistics.median(old_b1)) == pytest.approx(2.2)
  assert r["ratio_best"] == pytest.approx(0.5)
  assert r["ratio_median"] == pytest.approx(1.1 / 2.2)
  assert rows[1, "recover"]["ratio_best"] == pytest.approx(2.0 / 3.0)
  assert rows[4, "recover"]["ratio_best"] == pytest.approx(1.5)
  table = compare_trees.format_summary(list(rows.values()))
  assert "0.500" in table and "1.500" in table and len(table.splitlines()) == 5
  with pytest.raises(ValueError, match="only one tree"):
    compare_trees.summarize(records[:3])


def test_compare_trees_runs_each_tree_in_its_own_process(tmp_path, capsys):
  # The old tree has no g2face_jax/tools/: its own bench.py must run, not the installed
  # package's tools.bench (which an editable install would otherwise serve).
  old = _tree(tmp_path, "old", 2.0, 3.0, old_layout=True)
  new = _tree(tmp_path, "new", 1.0, 1.5)
  assert compare_trees.main([old, new, "--batch", "1,2", "--pairs", "2", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = {(r["batch"], r["path"]): r for r in out["rows"]}
  assert out["device"] == "fake" and len(rows) == 4
  assert rows[2, "anonymize"]["old_best_s"] == pytest.approx(4.0)  # each tree's own numbers
  assert rows[2, "anonymize"]["ratio_best"] == pytest.approx(0.5)
  assert rows[1, "recover"]["ratio_median"] == pytest.approx(0.5)
  assert rows[1, "recover"]["runs"] == 2


def test_official_compare_help_and_arguments(tmp_path):
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "official_compare.py"),
                         "--help"], capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert "OFFICIAL_TREE" in done.stdout and "--fixtures" in done.stdout
  with pytest.raises(SystemExit):
    official_compare.parse_args([str(tmp_path)])  # not the official tree
  for rel in official_compare.OFFICIAL_FILES.values():
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    (tmp_path / rel).write_text("")
  args = official_compare.parse_args([str(tmp_path), "--batch", "1,4", "--threads", "2"])
  assert (args.batch, args.threads, args.rounds) == ([1, 4], 2, 6)
  assert os.path.isdir(args.fixtures)  # the bundled official-seed0 folder


def test_official_compare_summary_math():
  r = official_compare.summary({"official": [8.0, 10.0, 12.0], "ours": [4.0, 4.4, 6.0]}, batch=4)
  assert (r["official_best_s"], r["ours_best_s"]) == (2.0, 1.0)
  assert r["official_median_s"] == pytest.approx(2.5)
  assert r["ours_median_s"] == pytest.approx(1.1)
  assert r["speedup_best"] == pytest.approx(2.0)
  assert r["speedup_median"] == pytest.approx(2.5 / 1.1)


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (1, 2)),
                                         (1, 1, (-1, 2))])
def test_official_compare_plain_upfirdn2d(up, down, pad):
  torch = pytest.importorskip("torch")
  from g2face_jax.nn import ops
  kernel = ops.fir_kernel_2d([1, 3, 3, 1], gain=up * up)
  x = np.random.default_rng(0).standard_normal((2, 9, 8, 3)).astype(np.float32)  # NHWC
  ours = official_compare.plain_ops().upfirdn2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                                torch.from_numpy(kernel), up=up, down=down,
                                                pad=pad)
  ref = np.asarray(ops.upfirdn2d_reference(x, kernel, up=up, down=down, pad=pad))
  np.testing.assert_allclose(ours.numpy().transpose(0, 2, 3, 1), ref, rtol=1e-5, atol=1e-5)


def test_official_compare_plain_fused_leaky_relu():
  torch = pytest.importorskip("torch")
  op = official_compare.plain_ops()
  x = np.random.default_rng(1).standard_normal((2, 5, 3, 3)).astype(np.float32)
  bias = np.arange(5, dtype=np.float32) - 2
  y = x + bias[None, :, None, None]
  want = np.where(y >= 0, y, 0.2 * y) * np.sqrt(2)
  got = op.fused_leaky_relu(torch.from_numpy(x), torch.from_numpy(bias))
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
  layer = op.FusedLeakyReLU(5)
  assert layer.bias.shape == (5,) and op.FusedLeakyReLU(5, bias=False).bias is None
  with torch.no_grad():
    layer.bias.copy_(torch.from_numpy(bias))
    np.testing.assert_allclose(layer(torch.from_numpy(x)).numpy(), want, rtol=1e-6)


def test_conv_forms_arguments_and_a_tiny_run(capsys):
  conv_forms = _load("conv_forms")
  args = conv_forms.parse_args(["--kernel", "4", "--stride", "2", "--channels", "8,16"])
  assert (args.padding, args.channels, args.forms) == (1, [8, 16], ["lax", "winograd_f2_3"])
  for bad in (["--forms", "nope"], ["--channels", "8"], ["--kernel-energy", "3,3,8"]):
    with pytest.raises(SystemExit):
      conv_forms.parse_args(bad)
  assert conv_forms.main(["--size", "8", "--channels", "8,8", "--rounds", "1",
                          "--forms", "winograd_f2_3,winograd_f4_3"]) == 0
  lines = capsys.readouterr().out.splitlines()
  diffs = [float(line.split("diff from lax")[1]) for line in lines if "diff from lax" in line]
  assert len(diffs) == 2 and max(diffs) < 1e-5  # the forms compute the same convolution


accelerator = _load("accelerator")


def test_accelerator_peaks_and_budget():
  assert accelerator.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
  assert accelerator.peak_flops("NVIDIA H200", "float32") == 67e12
  assert accelerator.peak_flops("cpu", "float32") is None
  budget = accelerator.Budget(0)
  assert not budget.allows("train float32 batch 4") and budget.skipped == [
      "train float32 batch 4"]


@pytest.mark.slow
def test_accelerator_script_on_the_tiny_config(tmp_path):
  """The whole script on CPU with the tiny config: a training record per dtype at the
  largest batch tried, inference at each batch and precision, one JSON document."""
  out = tmp_path / "record.json"
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"),
                         "--config", "tiny", "--train-batches", "2", "--batches", "1,2",
                         "--json-out", str(out)], capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stderr[-2000:]
  record = json.loads(out.read_text())
  assert record == json.loads(done.stdout)
  for dtype in ("float32", "bfloat16"):
    train = record["train"][dtype]
    assert train["per_device_batch"] == 2 and train["step_s"] > 0 and train["mfu"] is None
    assert train["gflop_per_step"] > 0 and train["temp_mb_per_device"] >= 0
  assert set(record["infer"]) == {f"{p}/{b}" for p in ("float32", "tf32", "bfloat16")
                                  for b in (1, 2)}
  assert all(r["anonymize_img_per_s"] > 0 for r in record["infer"].values())
  assert record["skipped"] == [] and record["wall_s"] > 0
