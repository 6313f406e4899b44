"""Our whole training iteration against the official one (`train_step.npz` of the parity
fixture folder, `G2FACE_PARITY_FIXTURES`; the repository keeps a trimmed copy), phase by
phase, with the tolerances the fixture README gives for each part:

- anonymize phase (recipe weights, recorded draws): every loss term 1e-4, the image
  1e-4, gradient norms 2e-3, full gradients Frobenius 1e-2, noise-weight gradients
  within 2e-3 of the phase's largest, BatchNorm statistics 1e-4, Adam's updates;
- recover phase, chained on our own anonymize update: losses 1e-3, gradient norms
  3e-2 (noise weights within 3e-2 of the largest), the update norms' median 2e-3,
  BatchNorm statistics after the iteration;
- discriminator phase fed the recorded recovered image (R1 on): losses 1e-4,
  gradient norms 2e-3, the R1 term's gradient norms 2e-3; chained on our own
  recovered image: losses 1e-3.

Gradients that are zero in exact arithmetic (the README's list) are not compared.
One process computes the iteration once (`train_parity.iteration`); it needs tens of
minutes and about 18 GB on a CPU, so CI runs this module alone (marker `alone`).
"""
import re

import numpy as np
import pytest

from g2face_jax.tools import train_parity as tp

pytestmark = [pytest.mark.slow, pytest.mark.alone]


@pytest.fixture(scope="module")
def fx(fixtures_dir):
  return tp.load(fixtures_dir)


# The official optimizer's group 1 (the README): the decoder's StyleGAN2 synthesis layers
_PRETRAINED = re.compile(r"decoder/(input|conv1|to_rgb1|convs\.\d+|to_rgbs\.\d+)\..+")


def _recorded_rate(fx, name):
  """The learning rate the recorded iteration used for the official parameter `name`."""
  return float(fx["lr_pretrained"] if _PRETRAINED.fullmatch(name) else fx["lr_new"])


@pytest.fixture(scope="module")
def ours(fixtures_dir):
  return tp.iteration(fixtures_dir)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _worst(errors):
  name = max(errors, key=errors.get)
  return name, errors[name]


# ---- anonymize ----------------------------------------------------------------------

def test_anonymize_losses_and_image(ours, fx):
  errors = tp.loss_errors(ours["anon"]["metrics"], fx)
  assert {"anon/total", "anon/landmark", "anon/hiding", "anon/lpips"} <= set(errors)
  assert max(errors.values()) <= 1e-4, errors
  assert _rel(ours["anon"]["image"], fx["anon/image"]) <= 1e-4


def test_anonymize_gradient_norms(ours, fx):
  plain, noisy = tp.gradient_norm_errors(ours["anon"]["grads"], fx, "anon")
  assert _worst(plain)[1] <= 2e-3, _worst(plain)
  assert _worst(noisy)[1] <= 2e-3, _worst(noisy)


def test_anonymize_full_gradients(ours, fx, fixtures_dir):
  """Every full gradient the fixture holds (laid out as ours): Frobenius 1e-2 (the
  noise weights are scalars, compared with the norms)."""
  recorded = {k.split("/", 2)[2]: fx[k] for k in fx if k.startswith("grad/anon/")}
  in_ours = tp.in_our_layout(fixtures_dir, recorded)
  checked = 0
  for name in recorded:
    if tp.zero_in_exact_arithmetic(name) or tp.is_noise_weight(name):
      continue
    ref = np.asarray(in_ours[name], np.float64)
    mine = np.asarray(ours["anon"]["grads"][name], np.float64)
    assert np.linalg.norm(mine - ref) <= 1e-2 * np.linalg.norm(ref), name
    checked += 1
  assert checked > 20


def test_anonymize_batchnorm_statistics(ours, fx):
  stats = ours["anon"]["stats"]
  keys = [k for k in fx if k.startswith("bn_after_anon/") and not k.endswith("tracked")]
  assert {k.split("/", 1)[1] for k in keys} == set(stats)
  for key in keys:
    assert _rel(stats[key.split("/", 1)[1]], fx[key]) <= 1e-4, key


def test_anonymize_updates(ours, fx, fixtures_dir):
  """Adam's first step moves each element by about lr x the sign of its gradient, so an
  element whose gradient is float noise may move either way. Where the fixture holds the
  updated tensor: every element moves by at most lr (plus an ulp of the weight); every
  element whose recorded gradient is farther from 0 than a float32 gradient element can
  err (2e-2 of its tensor's max, the README) moves by the recorded amount within 0.01 lr
  plus an ulp (a quarter of the elements or more). For the largest tensors (norms only) the update
  norms agree within 1e-3."""
  after = {k.split("/", 1)[1]: fx[k] for k in fx if k.startswith("after_anon/")}
  after = {n: a for n, a in after.items()
           if f"grad/anon/{n}" in fx and not tp.zero_in_exact_arithmetic(n)}
  before = tp.in_our_layout(fixtures_dir, {n: tp.recipe_tensor(fixtures_dir, n) for n in after})
  after = tp.in_our_layout(fixtures_dir, after)
  grads = tp.in_our_layout(fixtures_dir, {n: fx[f"grad/anon/{n}"] for n in after})
  norm_errors, elements, determined = {}, 0, 0
  for name, change in ours["anon"]["update"].items():
    if tp.zero_in_exact_arithmetic(name):
      continue
    if name not in after:
      ref = float(fx[f"update_norm/anon/{name}"])
      norm_errors[name] = abs(float(np.linalg.norm(change)) - ref) / ref
      continue
    lr = _recorded_rate(fx, name)
    w = np.asarray(before[name], np.float32)
    ulp = np.spacing(np.abs(w)).astype(np.float64)
    otherwise = np.abs(change - (np.asarray(after[name], np.float64) - w)) > 0.01 * lr + ulp
    g = np.abs(np.asarray(grads[name], np.float64))
    assert np.all(np.abs(change) <= lr * (1 + 1e-6) + ulp), name
    clear = g > 2e-2 * g.max()
    assert not np.any(otherwise[clear]), name
    elements += g.size
    determined += int(np.sum(clear))
  assert len(after) > 20 and determined > elements // 4, (len(after), determined, elements)
  assert _worst(norm_errors)[1] <= 1e-3, _worst(norm_errors)


# ---- recover (chained) -------------------------------------------------------------

def test_recover_losses(ours, fx):
  errors = tp.loss_errors(ours["rec"]["metrics"], fx)
  assert {"rec/total", "rec/id_same", "rec/gan", "rec/hiding"} <= set(errors)
  assert max(errors.values()) <= 1e-3, errors
  assert _rel(ours["rec"]["image"], fx["rec/image"]) <= 1e-2


def test_recover_gradient_norms(ours, fx):
  """map_2_id is not in the recover graph: no gradient, as `grad_none/rec` lists."""
  none = {str(n) for n in fx["grad_none/rec"]}
  grads = ours["rec"]["grads"]
  for name in none:
    assert not np.any(grads[name]), name
  plain, noisy = tp.gradient_norm_errors({k: v for k, v in grads.items() if k not in none}, fx, "rec")
  assert _worst(plain)[1] <= 3e-2, _worst(plain)
  assert _worst(noisy)[1] <= 3e-2, _worst(noisy)


def test_recover_update_norms_and_statistics(ours, fx):
  none = {str(n) for n in fx["grad_none/rec"]}
  errors = []
  for name, change in ours["rec"]["update"].items():
    ref = float(fx[f"update_norm/rec/{name}"])
    if name in none:
      assert ref == 0 and not np.any(change), name
    elif not tp.zero_in_exact_arithmetic(name):
      errors.append(abs(float(np.linalg.norm(change)) - ref) / ref)
  assert np.median(errors) <= 2e-3
  stats = ours["rec"]["stats"]
  for key in (k for k in fx if k.startswith("bn_after/") and not k.endswith("tracked")):
    assert _rel(stats[key.split("/", 1)[1]], fx[key]) <= 1e-2, key


# ---- discriminator -----------------------------------------------------------------

def test_discriminator_on_the_recorded_recovered_image(ours, fx):
  errors = tp.loss_errors(ours["disc"]["metrics"], fx)
  assert {"disc/real", "disc/fake", "disc/r1", "disc/total"} <= set(errors)
  assert max(errors.values()) <= 1e-4, errors
  plain, _ = tp.gradient_norm_errors(ours["disc"]["grads"], fx, "disc")
  assert _worst(plain)[1] <= 2e-3, _worst(plain)


def test_r1_term_gradient_norms(ours, fx):
  """The R1 term alone (5 x penalty); the final linear bias does not enter it."""
  grads = ours["disc_r1"]["grads"]
  refs = {k.split("/", 2)[2]: float(fx[k]) for k in fx if k.startswith("grad_norm/disc_r1/")}
  assert set(refs) <= set(grads)
  errors = {}
  for name, g in grads.items():
    ref = refs.get(name, 0.0)
    norm = float(np.linalg.norm(np.asarray(g, np.float64)))
    if ref == 0.0:
      assert norm == 0.0, name
    else:
      errors[name] = abs(norm - ref) / ref
  assert _worst(errors)[1] <= 2e-3, _worst(errors)


def test_discriminator_update_norms(ours, fx):
  errors = {name: abs(float(np.linalg.norm(np.asarray(u, np.float64)))
                      - float(fx[f"update_norm/disc/{name}"]))
                  / float(fx[f"update_norm/disc/{name}"])
            for name, u in ours["disc"]["update"].items()}
  assert _worst(errors)[1] <= 1e-3, _worst(errors)


def test_discriminator_chained_on_our_recovered_image(ours, fx):
  errors = tp.loss_errors(ours["disc_chained"]["metrics"], fx)
  assert max(errors.values()) <= 1e-3, errors
