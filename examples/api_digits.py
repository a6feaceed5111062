"""The Python API on the digits data: run with ``mpirun -n 3 python -m mpi4py examples/api_digits.py``.

Every rank runs this same script; each keeps only its own neurons and its own input
columns of X. ``python -m mpi4py`` makes an uncaught error on one rank end the whole job.
"""

import sys
from pathlib import Path

import h5py

import mpinn

DATA = Path(__file__).resolve().parent.parent / "data"
MODEL = sys.argv[1] if len(sys.argv) > 1 else "m.h5"


def read(path: Path):
    with h5py.File(path, "r") as f:  # every rank reads the same arrays
        return f["X"][...], f["y"][...]


X, y = read(DATA / "digits_train.h5")
Xv, yv = read(DATA / "digits_test.h5")

net = mpinn.Network.create(MODEL, sizes=[64, 128, 10], activation="relu", output="softmax",
                           seed=1)            # refuses an existing file unless force=True
net = mpinn.Network.open(MODEL, strategy="percentage", percentages=[30, 30, 40])
history = net.fit(X, y, epochs=20, batch_size=64, optimizer="adam", lr=1e-3,
                  validation_data=(Xv, yv))
probs = net.predict(X)
metrics = net.evaluate(Xv, yv)
net.save()
net.close()

if net.comm.rank == 0:
    last = history.epochs[-1]
    print(f"epochs {len(history)}  loss {last['loss']:.4f}  val_loss {last['val_loss']:.4f}  "
          f"val_accuracy {last['val_accuracy']:.4f}")
    print(f"predict {probs.shape}  evaluate loss {metrics['loss']:.4f}  "
          f"accuracy {metrics['accuracy']:.4f}")
