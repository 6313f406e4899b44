"""FID: the Flax FID InceptionV3 + converter against a PyTorch reference network,
the network through a bundle (`g2face convert --inception`, `g2face eval
--fid-bundle`), the Frechet distance against closed forms, and the one-line errors.

The reference is written here with torch.nn layers from the published facts of
pytorch-fid 0.3.0's `InceptionV3([3], resize_input=True, normalize_input=True,
use_fid_inception=True)` (torchvision's Inception3 layer names and widths, the
FID patches: unpadded average pools in A, C and the first E block, a max pool
in the last E block, BN eps 0.001), because pytorch-fid needs torchvision, and
no CPU build of torchvision matching torch 2.13.0 installs here.
"""
import json

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from g2face_jax import bundle, cli, photo
from g2face_jax.privacy import keys
from g2face_jax.convert import inception as convert_inception
from g2face_jax.convert.table import ConversionError
from g2face_jax.eval import fid, report
from g2face_jax.nn import inception
from test_eval_report import eval_bundle, faces_dir  # noqa: F401  (fixtures)


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def unpadded_avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, 1)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(unpadded_avg_pool(x))], 1)


class BlockB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, 1)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(unpadded_avg_pool(x))], 1)


class BlockD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, 1)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else unpadded_avg_pool(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                      self.branch_pool(pooled)], 1)


class ReferenceFIDInception(nn.Module):
  """(B, 3, H, W) in [0, 1] -> (B, 2048); state dict keys as in pt_inception-2015-12-05."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
    self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)  # in the weights file, unused by FID

  def forward(self, x):
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


@pytest.fixture(scope="module")
def reference():
  """Random weights, random BN affines, running statistics of one calibration batch."""
  torch.manual_seed(0)
  net = ReferenceFIDInception()
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      nn.init.uniform_(m.weight, 0.5, 1.5)
      nn.init.uniform_(m.bias, -0.2, 0.2)
      m.momentum = None  # the running statistics become those of the one batch below
  net.train()
  with torch.no_grad():
    net(torch.rand(2, 3, 64, 64))
  return net.eval()


@pytest.fixture(scope="module")
def weights_file(reference, tmp_path_factory):
  path = tmp_path_factory.mktemp("fid") / convert_inception.WEIGHTS_FILE
  torch.save(reference.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def fid_bundle(weights_file, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fid_bundle") / "fid")
  assert cli.main(["convert", "--inception", str(weights_file), "--out", out]) == 0
  return out


def relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("size", [(37, 53), (320, 301)])
def test_resize_matches_torch_bilinear(size):
  x = np.random.default_rng(0).random((2, *size, 3), dtype=np.float32)
  ours = np.asarray(inception.resize_bilinear(x))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert np.max(np.abs(ours - ref)) < 1e-6  # measured: 1 float32 ulp


def test_network_and_converter_match_the_reference(reference, weights_file):
  images = np.random.default_rng(1).random((3, 100, 100, 3), dtype=np.float32)
  uint8 = np.round(images[:2] * 255).astype(np.uint8)  # uint8 in [0, 255] reads as / 255
  with torch.no_grad():
    ref = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ref_uint8 = reference(torch.from_numpy(uint8 / np.float32(255)).permute(0, 3, 1, 2)).numpy()
  features = fid.InceptionFeatures(convert_inception.load(weights_file), batch_size=2)
  ours = features(images)  # a full batch of 2, then 1 padded to 2
  assert ours.shape == ref.shape == (3, inception.FEATURES)
  # measured 2.5e-6; with random weights, float32 rounding of the upsampled input alone moves
  # the reference by 1e-5 against float64 at this size (3e-4 at 75x75), so 1e-4 is not loose
  assert relative_error(ours, ref) <= 1e-4
  assert relative_error(features(uint8), ref_uint8) <= 1e-4


def test_the_bundle_holds_the_converted_network(weights_file, fid_bundle):
  """`g2face eval --fid-bundle` reads exactly the variables the parity test above checks."""
  direct = convert_inception.load(weights_file)
  assert bundle.load(fid_bundle).manifest["networks"] == ["inception"]
  stored = fid.features_from_bundle(fid_bundle).variables
  assert jax.tree.structure(stored) == jax.tree.structure(direct)
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(direct)):
    np.testing.assert_array_equal(a, b)


def numpy_state_dict(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def test_converter_errors_name_the_file_and_key(reference, tmp_path, arcface_like):
  with pytest.raises(ConversionError) as e:
    convert_inception.load(arcface_like)
  assert str(e.value).startswith(f"{arcface_like}: expected the FID InceptionV3 state dict")
  assert "ArcFace" in str(e.value) and "\n" not in str(e.value)

  good = numpy_state_dict(reference)
  missing = {k: v for k, v in good.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}
  misshapen = good | {"Mixed_6c.branch7x7_2.conv.weight": np.zeros((160, 160, 7, 1), np.float32)}
  unexpected = good | {"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32)}
  for state, words in ((missing, "missing weights for ['params/Mixed_6c/branch7x7_2/conv/kernel']"),
                       (misshapen, "key 'Mixed_6c.branch7x7_2.conv.weight' has shape (160, 160, 7, 1)"),
                       (unexpected, "unexpected key(s) ['AuxLogits.conv0.conv.weight']")):
    with pytest.raises(ConversionError) as e:
      convert_inception.convert_inception(state, "inception.pth")
    assert str(e.value).startswith("inception.pth: ") and words in str(e.value)
    assert "\n" not in str(e.value)

  with pytest.raises(FileNotFoundError, match="nowhere.pth: file not found"):
    convert_inception.load(tmp_path / "nowhere.pth")


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(expected, rel=1e-10)
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with the sample (N - 1) standard deviations
  a, b = rng.normal(1, 2, 50), rng.normal(-1, 0.5, 70)
  one_d = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
  assert fid.fid(a[:, None], b[:, None]) == pytest.approx(one_d, rel=1e-10)


def test_fid_of_full_covariances_matches_an_eigenvalue_reference():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
  y = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 0.5
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  # Tr sqrt(S1 S2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(w)) @ v.T
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
  diff = x.mean(0) - y.mean(0)
  expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross
  assert fid.fid(x, y) == pytest.approx(expected, rel=1e-8)


def test_fid_of_identical_sets_is_zero_even_with_singular_covariances():
  features = np.random.default_rng(4).normal(size=(6, 64))  # rank 5 covariance in 64 dimensions
  assert abs(fid.fid(features, features)) < 1e-6 * np.trace(np.cov(features, rowvar=False))


def test_a_product_without_square_root_gets_the_eps_offset_and_imaginary_roots_are_refused():
  nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # no square root: sqrtm gives inf
  eps = fid.SQRTM_EPS  # then (S1 + eps I)(S2 + eps I) = (1 + eps) [[eps, 1], [0, eps]]
  expected = 0.0 + 2.0 - 2 * 2 * np.sqrt(eps * (1 + eps))
  got = fid.frechet_distance(np.zeros(2), nilpotent, np.zeros(2), np.eye(2))
  assert got == pytest.approx(expected, rel=1e-9)
  with pytest.raises(ValueError, match="imaginary part of 1"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))  # sqrt(-I) = i I


def test_fid_needs_two_images_and_matching_dimensions():
  with pytest.raises(ValueError, match="at least 2"):
    fid.fid(np.zeros((1, 8)), np.zeros((5, 8)))
  with pytest.raises(ValueError, match="mismatched statistics"):
    fid.fid(np.ones((3, 8)) * np.arange(3)[:, None], np.ones((3, 4)) * np.arange(3)[:, None])


class ColourStatistics:
  """Stand-in for the network in the report tests (its parity is tested above): per-image
  channel means and standard deviations, (N, 6). Takes the converted variables like
  `fid.InceptionFeatures`, so the bundle's network is still read."""

  def __init__(self, variables, batch_size=None):
    del batch_size
    assert "Mixed_7c" in variables["params"]

  def __call__(self, images):
    x = np.asarray(images, np.float64) / 255.0
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


@pytest.fixture
def arcface_like(tmp_path):
  path = tmp_path / "ms1mv3_arcface_r50.pth"
  torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "prelu.weight": torch.zeros(64),
              "fc.weight": torch.zeros(512, 25088)}, path)
  return path


@pytest.mark.slow  # a cold evaluation of 2 images: ~1 min on 2 busy cores
def test_eval_reports_fid_of_anonymized_and_recovered(monkeypatch, tmp_path, faces_dir, eval_bundle,
                                                      key_file, fid_bundle):
  monkeypatch.setattr(fid, "InceptionFeatures", ColourStatistics)
  out = tmp_path / "report"
  code = cli.main(["eval", "--data", f"{faces_dir}/face0.png", f"{faces_dir}/face1.png",
                   "--bundle", eval_bundle, "--key", key_file, "--out", str(out),
                   "--codec", "official", "--fid-bundle", fid_bundle])
  assert code == 0
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["images"] == 2 and summary["fid"].startswith("InceptionV3 pool3 features of 2 images")
  for name in ("fid_anonymized", "fid_recovered"):
    assert np.isfinite(summary[name]) and summary[name] >= -1e-9, name
  table = (out / "report.md").read_text()
  assert "| FID anon vs orig |" in table and "| FID recovered vs orig |" in table


def test_evaluation_summary_gives_fid_figures_or_says_why_not(eval_bundle, key_file, faces_dir):
  tool = photo.Anonymizer(eval_bundle, keys.load(key_file), codec="official")
  without = report.Evaluation(tool, keys.generate(), keys.generate())
  without.add_fid_images(*[np.zeros((32, 32, 3), np.uint8)] * 3)
  summary = without.summary()
  assert summary["fid"] == ("skipped: pass --fid-bundle, a bundle of `g2face convert --inception "
                            "pt_inception-2015-12-05-6726825d.pth`, to compute FID")
  assert "fid_anonymized" not in summary
  assert f"FID: {summary['fid']}" in report.markdown(summary, "t")

  stats = ColourStatistics({"params": {"Mixed_7c": 0}})
  evaluation = report.Evaluation(tool, keys.generate(), keys.generate(), inception_features=stats)
  faces = [np.array(Image.open(f"{faces_dir}/face{i}.png")) for i in range(3)]
  evaluation.add_fid_images(faces[0], faces[1], faces[0])
  assert evaluation.summary()["fid"] == "skipped: FID needs at least 2 evaluated images, got 1"
  evaluation.add_fid_images(faces[1], faces[2], faces[1])
  summary = evaluation.summary()
  original, anonymized = stats(np.stack(faces[:2])), stats(np.stack(faces[1:]))
  assert summary["fid_anonymized"] == pytest.approx(fid.fid(anonymized, original), rel=1e-9)
  assert abs(summary["fid_recovered"]) < 1e-9  # recovered == original here
  table = report.markdown(summary, "t")
  assert f"| FID anon vs orig | {summary['fid_anonymized']:.4f} | lower |" in table
  assert "| FID recovered vs orig |" in table


def test_eval_names_a_bundle_without_the_network_in_one_line(capsys, tmp_path, faces_dir,
                                                            eval_bundle, key_file):
  code = cli.main(["eval", "--data", faces_dir, "--bundle", eval_bundle, "--key", key_file,
                   "--out", str(tmp_path / "report"), "--fid-bundle", eval_bundle])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err
  assert err.startswith(f"g2face eval: error: {eval_bundle}: bundle has no inception, needed to "
                        "compute FID (inception comes from `g2face convert --inception")


def test_convert_names_a_wrong_inception_file_in_one_line(capsys, tmp_path, arcface_like):
  code = cli.main(["convert", "--inception", str(arcface_like), "--out", str(tmp_path / "fid")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err
  assert err.startswith(f"g2face convert: error: {arcface_like}: expected the FID InceptionV3 "
                        "state dict")
  assert not (tmp_path / "fid").exists()
