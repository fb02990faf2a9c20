"""Data: benchmark ground truth, descriptor files and small real image data sets."""
from .datasets import ImageDataset, default_data_dir, load_coil20, load_digits, load_mpeg7
from .io import atomic_write
from .loaders import GroundTruth, load_descriptors, load_gnd, save_descriptors

__all__ = [
    "GroundTruth",
    "ImageDataset",
    "atomic_write",
    "default_data_dir",
    "load_coil20",
    "load_descriptors",
    "load_digits",
    "load_gnd",
    "load_mpeg7",
    "save_descriptors",
]
