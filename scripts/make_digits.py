"""Convert scikit-learn's 8x8 digits into data/digits_{train,test}.h5 (needs scikit-learn).

Features are divided by 16 so they lie in [0, 1]; the split is 80/20, stratified, seed 0.
The files are committed, so running mpinn needs no scikit-learn.
"""

import sys
from pathlib import Path

import h5py
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main(out_dir: str = "data") -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y)
    for name, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        path = Path(out_dir) / f"digits_{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("X", data=xs)
            f.create_dataset("y", data=ys)
            f.attrs["source"] = "sklearn.datasets.load_digits, features / 16, 80/20 split seed 0"
        print(f"{path}: {xs.shape[0]} samples")


if __name__ == "__main__":
    main(*sys.argv[1:])
