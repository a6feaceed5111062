"""Digits with validation-based early stopping: train on 80% of digits_train, validate on the
rest, keep the best; report the test accuracy of MODEL.best.h5.

    mpirun -n 3 python -m mpi4py examples/digits_early_stopping.py /tmp/digits.h5
"""

import sys
from pathlib import Path

import h5py

import mpinn

DATA = Path(__file__).resolve().parent.parent / "data"


def read(path):
    with h5py.File(path, "r") as f:
        return f["X"][...], f["y"][...]

X, y = read(DATA / "digits_train.h5")
Xt, yt = read(DATA / "digits_test.h5")
cut = int(0.8 * len(X))
model = sys.argv[1] if len(sys.argv) > 1 else "digits.h5"
mpinn.Network.create(model, sizes=[64, 128, 10], seed=1, force=True)
with mpinn.Network.open(model) as net:
    h = net.fit(X[:cut], y[:cut], epochs=200, batch_size=64, optimizer="adam", lr=1e-3,
                validation_data=(X[cut:], y[cut:]), patience=10, keep_best=True)
with mpinn.Network.open(model.replace(".h5", ".best.h5")) as best:
    m = best.evaluate(Xt, yt)
    e = best.epoch
if net.comm.rank == 0:
    print(f"stopped after {len(h)} epochs ({h.stopped_early}); best val_loss {h.best_val_loss:.4f} "
          f"at epoch {e}; val_accuracy there {h.epochs[e - 1]['val_accuracy']:.4f}; "
          f"test loss {m['loss']:.4f} test accuracy {m['accuracy']:.4f}")
