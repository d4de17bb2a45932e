"""Dataset sources and the in-memory Dataset."""

from cleanse.data.dataset import Dataset, load_dataset_file, save_dataset
from cleanse.data.sources import load_data, load_image_files
from cleanse.data.synthetic import make_synthetic

__all__ = ["Dataset", "load_data", "load_dataset_file", "load_image_files", "make_synthetic", "save_dataset"]
