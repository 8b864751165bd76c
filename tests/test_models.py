"""Tests of har_jax.models: parameter counts, exits, heads, dtypes, FLOPs, segments."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from har_jax import cpu_conv
from har_jax import models
from har_jax.models import layers

NUM_CLASSES = 10
IMAGES = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


def _abstract_variables(model, image_shape):
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def _num_params(model, image_shape):
  params = _abstract_variables(model, image_shape)["params"]
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def _init(model):
  return model.init(jax.random.key(0), IMAGES, train=False)


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("name, num_classes, exits, head, image_shape, expected", [
    # LDAM-DRW's resnet32 (option-A shortcuts: no shortcut parameters).
    ("resnet32", 10, "CBBBE", "linear", (32, 32, 3), 464_154),
    # The cosine classifier has no bias: 10 parameters fewer.
    ("resnet32", 10, "CBBBE", "normed", (32, 32, 3), 464_144),
    # torchvision's resnet50 and resnext50_32x4d.
    ("resnet50", 1000, "CBBBBE", "linear", (224, 224, 3), 25_557_032),
    ("resnext50_32x4d", 1000, "CBBBBE", "linear", (224, 224, 3), 25_028_904),
])
def test_parameter_count_matches_reference(name, num_classes, exits, head,
                                           image_shape, expected):
  model = models.get_model(name, num_classes=num_classes, exits=exits, head=head)
  assert _num_params(model, image_shape) == expected


def test_parameter_names_say_which_piece_they_belong_to():
  params = _abstract_variables(models.resnet8(NUM_CLASSES, exits="CEBEBEBE"),
                               (16, 16, 3))["params"]
  assert set(params) == {"stem", "stage1_block0", "stage2_block0", "stage3_block0",
                         "exit0", "exit1", "exit2", "classifier"}


@pytest.mark.parametrize("exits", ["CBBBE", "CEBBBE", "CBEBEBE", "CEBEBEBE"])
def test_logits_are_float32_one_row_per_exit(exits):
  model = models.resnet8(NUM_CLASSES, exits=exits)
  logits = model.apply(_init(model), IMAGES, train=False)
  assert logits.shape == (exits.count("E"), IMAGES.shape[0], NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("factory", [models.resnet50, models.resnext50_32x4d])
def test_imagenet_models_logits_shape(factory):
  model = factory(1000, exits="CEBEBEBEBE", dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = _abstract_variables(model, (224, 224, 3))
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                          variables, images)
  assert (logits.shape, logits.dtype) == ((5, 2, 1000), jnp.float32)


def test_resnet50_mini_has_resnet50s_exits_at_a_fraction_of_its_cost():
  for exits in ("CBBBBE", "CBBBEBE", "CBBEBEBE", "CBEBEBEBE", "CEBEBEBEBE"):
    assert (models.resnet50_mini(NUM_CLASSES, exits=exits).exit_positions
            == models.resnet50(NUM_CLASSES, exits=exits).exit_positions), exits
  mini = models.resnet50_mini(NUM_CLASSES, exits="CEBEBEBEBE")
  params = _abstract_variables(mini, (32, 32, 3))["params"]
  assert {"stage4_block0", "exit3", "classifier"} <= set(params)
  assert "stage1_block1" not in params
  # One block a stage at 1/8 of the widths: under 2% of ResNet-50's 25.6 M,
  # its four exit heads included.
  assert _num_params(mini, (32, 32, 3)) < 500_000
  assert models.exit_flops(mini, (32, 32, 3)).backbone < 1e7


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  model_f32 = models.resnet8(NUM_CLASSES, exits="CEBEBEBE")
  model_bf16 = models.resnet8(NUM_CLASSES, exits="CEBEBEBE", dtype=jnp.bfloat16)
  variables = _init(model_bf16)
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  features = model_bf16.apply(variables, IMAGES, 0, train=False,
                              method=models.ResNet.segment)
  assert features.dtype == jnp.bfloat16
  logits = model_bf16.apply(variables, IMAGES, train=False)
  assert logits.dtype == jnp.float32
  reference = model_f32.apply(variables, IMAGES, train=False)
  error = np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
  assert error < 0.05, f"bfloat16 logits differ from float32 by {error:.3f} (relative)"


def test_normed_head_is_a_bias_free_cosine_classifier():
  model = models.resnet8(NUM_CLASSES, exits="CBEBBE", head="normed")
  variables = _init(model)
  assert set(variables["params"]["classifier"]) == {"kernel"}
  assert set(variables["params"]["exit0"]["classifier"]) == {"kernel"}
  logits = model.apply(variables, IMAGES, train=False)
  assert np.all(np.abs(logits) <= 1 + 1e-6)

  x = jax.random.normal(jax.random.key(2), (4, 8))
  layer = models.NormedLinear(NUM_CLASSES)
  layer_params = layer.init(jax.random.key(3), x)
  kernel = np.asarray(layer_params["params"]["kernel"])
  np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)
  x_unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  kernel_unit = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
  np.testing.assert_allclose(layer.apply(layer_params, x), x_unit @ kernel_unit,
                             rtol=1e-5, atol=1e-6)


def test_call_equals_segments_and_exit_heads_composed_by_hand():
  model = models.resnet8(NUM_CLASSES, exits="CEBEBEBE")
  variables = _init(model)
  x = IMAGES
  by_hand = []
  for index in range(model.num_exits):
    x = model.apply(variables, x, index, train=False, method=models.ResNet.segment)
    by_hand.append(model.apply(variables, x, index, train=False,
                               method=models.ResNet.exit_head))
  np.testing.assert_allclose(model.apply(variables, IMAGES, train=False),
                             np.stack(by_hand), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=re.escape("exit index must be in [0, 4)")):
    model.apply(variables, IMAGES, -1, train=False, method=models.ResNet.segment)


def test_train_mode_updates_every_batch_statistic_and_eval_is_deterministic():
  model = models.resnet8(NUM_CLASSES, exits="CEBEBEBE")
  variables = _init(model)
  _, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
  old = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(updates["batch_stats"])
  unchanged = [jax.tree_util.keystr(path) for (path, before), after in zip(old, new)
               if np.allclose(before, after)]
  assert not unchanged, f"batch statistics not updated in train mode: {unchanged}"

  first = model.apply(variables, IMAGES, train=False)
  second = model.apply(variables, IMAGES, train=False)
  np.testing.assert_array_equal(first, second)


# ----------------------------------------------------------------- exit strings


@pytest.mark.parametrize("exits, num_stages, expected", [
    ("CBBBE", 3, (3,)),
    ("CBEBEBE", 3, (1, 2, 3)),
    ("CEBBBE", 3, (0, 3)),
    ("CBBBBE", 4, (4,)),
    ("CEBEBEBEBE", 4, (0, 1, 2, 3, 4)),
])
def test_parse_exits(exits, num_stages, expected):
  assert models.parse_exits(exits, num_stages) == expected


@pytest.mark.parametrize("exits, message", [
    ("CBXBE", "'X' at index 2"),
    ("cbbbe", "'c' at index 0"),
    ("BBBE", "must start with 'C'"),
    ("", "must start with 'C'"),
    ("CBCBBE", "second 'C' at index 2"),
    ("CBBB", "must end with 'E'"),
    ("CBEEBBE", "'EE' at index 2"),
    ("CBEBE", "has 2 'B' (stages) but resnet32 has 3"),
    ("CBBBBE", "has 4 'B' (stages) but resnet32 has 3"),
])
def test_parse_exits_errors_name_the_problem(exits, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    models.parse_exits(exits, 3, model_name="resnet32")


def test_factories_validate_arguments_early():
  with pytest.raises(ValueError, match=re.escape("but resnet32 has 3")):
    models.resnet32(NUM_CLASSES, exits="CBEBE")
  with pytest.raises(ValueError, match="'linear', 'normed'"):
    models.resnet32(NUM_CLASSES, head="cosine")
  with pytest.raises(ValueError, match="resnext50_32x4d"):
    models.get_model("resnet18", num_classes=NUM_CLASSES)


# ------------------------------------------------------------------------ FLOPs


def _resnet32_macs(num_classes):
  """Closed form: 3x3 stem, 5 blocks of two 3x3 convs per stage, classifier."""
  macs = 9 * 3 * 16 * 32 * 32
  for in_width, width, size in [(16, 16, 32), (16, 32, 16), (32, 64, 8)]:
    # The first conv of a stage changes the width; option-A shortcuts cost nothing.
    macs += 9 * in_width * width * size * size + 9 * 9 * width * width * size * size
  return macs + 64 * num_classes


def _imagenet_resnet_macs(num_classes, groups=1, width_per_group=64):
  """Closed form of torchvision's ResNet-50 / ResNeXt-50 at 224x224."""
  macs = 7 * 7 * 3 * 64 * 112 * 112
  size, in_features = 56, 64  # After the stride-2 stem and max pool.
  for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    width = planes * width_per_group // 64 * groups
    out_features = 4 * planes
    for block in range(blocks):
      out_size = size // 2 if stage > 0 and block == 0 else size
      macs += in_features * width * size * size  # 1x1 before the strided 3x3.
      macs += 9 * width * (width // groups) * out_size * out_size
      macs += width * out_features * out_size * out_size
      if block == 0:
        macs += in_features * out_features * out_size * out_size  # Projection.
      size, in_features = out_size, out_features
  return macs + 2048 * num_classes


def _exit_head_macs(in_features, height, width, num_classes):
  """The ExitHead docstring's formula."""
  conv_width = min(2 * in_features, 128)
  return (9 * in_features * conv_width * math.ceil(height / 2) * math.ceil(width / 2)
          + conv_width * num_classes)


def test_resnet32_flops_match_closed_form():
  flops = models.exit_flops(models.resnet32(NUM_CLASSES, exits="CBBBE"), (32, 32, 3))
  assert flops.backbone == _resnet32_macs(NUM_CLASSES)
  assert flops.per_exit == (flops.backbone,)
  assert abs(flops.backbone / 69e6 - 1) < 0.01, flops.backbone


@pytest.mark.parametrize("factory, kwargs, reference", [
    (models.resnet50, {}, 4.1e9),
    (models.resnext50_32x4d, {"groups": 32, "width_per_group": 4}, 4.2e9),
])
def test_imagenet_flops_match_closed_form(factory, kwargs, reference):
  flops = models.exit_flops(factory(1000), (224, 224, 3))
  assert flops.backbone == _imagenet_resnet_macs(1000, **kwargs)
  assert abs(flops.backbone / reference - 1) < 0.02, flops.backbone


@pytest.mark.parametrize("name, exits, image_shape, num_classes, head_inputs", [
    # Exits after stages 1 and 2 of ResNet-32: [32x32x16], [16x16x32].
    ("resnet32", "CBEBEBE", (32, 32, 3), 10, [(16, 32, 32), (32, 16, 16)]),
    # Every exit of ResNet-50: after the stem and stages 1-3.
    ("resnet50", "CEBEBEBEBE", (224, 224, 3), 1000,
     [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14)]),
])
def test_per_exit_flops_add_up(name, exits, image_shape, num_classes, head_inputs):
  model = models.get_model(name, num_classes=num_classes, exits=exits)
  flops = models.exit_flops(model, image_shape)
  no_early_exits = re.sub("E(?!$)", "", exits)
  plain = models.exit_flops(
      models.get_model(name, num_classes=num_classes, exits=no_early_exits),
      image_shape)
  assert flops.backbone == plain.backbone
  assert flops.heads[:-1] == tuple(_exit_head_macs(*shape, num_classes)
                                   for shape in head_inputs)
  assert sum(flops.segments) + flops.heads[-1] == flops.backbone
  assert all(a < b for a, b in zip(flops.per_exit, flops.per_exit[1:])), flops.per_exit
  assert flops.per_exit[-1] == flops.backbone + sum(flops.heads[:-1])
  assert flops.per_exit[0] == flops.segments[0] + flops.heads[0]


@pytest.mark.parametrize("dtype, native", [(jnp.float32, False), (jnp.bfloat16, False),
                                           (jnp.float32, True)])
def test_batch_norm_matches_flax_values_statistics_and_gradients(dtype, native):
  """Native: inside native_convolutions, the gradient's sums run on the CPU kernel."""
  if native and not cpu_conv.compiler_found():
    pytest.skip("no C++ compiler to build the CPU kernels")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.5, 2.0, (6, 5, 4, 16)), dtype)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ours = layers.batch_norm(train=True, dtype=dtype)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                         dtype=dtype, param_dtype=jnp.float32)
  variables = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, variables)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)}
  stats = {"mean": jnp.asarray(rng.standard_normal(16), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32)}

  def run(module, params, x):
    with cpu_conv.native_convolutions(native and module is ours):
      y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                mutable=["batch_stats"])
    return jnp.sum(nn.relu(y).astype(jnp.float32) * cotangent), (y, updates)

  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  (_, (y_ours, up_ours)), g_ours = jax.value_and_grad(
      lambda p, x: run(ours, p, x), argnums=(0, 1), has_aux=True)(params, x)
  (_, (y_flax, up_flax)), g_flax = jax.value_and_grad(
      lambda p, x: run(flax_bn, p, x), argnums=(0, 1), has_aux=True)(params, x)
  assert y_ours.dtype == y_flax.dtype == dtype
  np.testing.assert_allclose(np.float32(y_ours), np.float32(y_flax), atol=tolerance)
  for a, b in zip(jax.tree.leaves(up_ours), jax.tree.leaves(up_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tolerance,
                               atol=tolerance * float(np.max(np.abs(np.float32(b)))))
  # Evaluation mode uses the running statistics, as Flax's does.
  eval_ours = layers.batch_norm(train=False, dtype=dtype)
  eval_flax = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype)
  both = {"params": params, "batch_stats": stats}
  np.testing.assert_allclose(np.float32(eval_ours.apply(both, x)),
                             np.float32(eval_flax.apply(both, x)), atol=tolerance)


def test_batch_norm_without_dtype_promotes_as_flax_does():
  x = jnp.ones((4, 16), jnp.bfloat16)
  ours = layers.BatchNorm(use_running_average=False)
  flax_bn = nn.BatchNorm(use_running_average=False)
  for module in (ours, flax_bn):
    assert module.init_with_output(jax.random.key(0), x)[0].dtype == jnp.float32
