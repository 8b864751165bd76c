"""Long-tailed data: class counts, shot groups, data sets and re-sampling."""

from har_jax.data.augment import normalize
from har_jax.data.augment import random_crop_flip
from har_jax.data.digits import load_digits
from har_jax.data.long_tail import FEW
from har_jax.data.long_tail import MANY
from har_jax.data.long_tail import MEDIUM
from har_jax.data.long_tail import SHOT_GROUP_NAMES
from har_jax.data.long_tail import long_tail_counts
from har_jax.data.long_tail import shot_groups
from har_jax.data.pipeline import ArrayDataset
from har_jax.data.pipeline import InMemoryData
from har_jax.data.pipeline import eval_batches
from har_jax.data.pipeline import num_eval_batches
from har_jax.data.pipeline import steps_per_epoch
from har_jax.data.pipeline import train_batch
from har_jax.data.pipeline import train_indices
from har_jax.data.sampling import SAMPLERS
from har_jax.data.sampling import Resampling
from har_jax.data.sampling import class_sampling_shares
from har_jax.data.specs import DATASET_SPECS
from har_jax.data.specs import DatasetSpec
from har_jax.data.specs import dataset_spec
