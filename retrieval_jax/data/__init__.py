"""Data: benchmark ground truth, descriptor files and small real image data sets."""
from .datasets import ImageDataset, default_data_dir, load_coil20, load_digits, load_mpeg7
from ..files import atomic_write, clean_stale_temps, npz_names, read_npz, write_csv
from .loaders import GroundTruth, load_descriptors, load_gnd, save_descriptors

__all__ = [
    "GroundTruth",
    "ImageDataset",
    "atomic_write",
    "clean_stale_temps",
    "npz_names",
    "read_npz",
    "write_csv",
    "default_data_dir",
    "load_coil20",
    "load_descriptors",
    "load_digits",
    "load_gnd",
    "load_mpeg7",
    "save_descriptors",
]

# Optional TensorFlow Datasets builders (extra [tfds]): imported on first use only,
# so `import retrieval_jax.data` never imports TensorFlow.
_TFDS_NAMES = ("LabelledImageFolder", "RevisitedOxfordParis", "load_tfds_folder",
               "load_tfds_revisited")


def __getattr__(name):
    if name in _TFDS_NAMES:
        from . import tfds_builders  # raises ImportError with an install hint without the extra

        return getattr(tfds_builders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
