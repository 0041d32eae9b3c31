"""Small framework models built in the tests (no downloads): a torch CNN exported with torch.export, XGBoost
and LightGBM boosters, a Keras model saved as a SavedModel, a scikit-learn pipeline, and hostile files
(pickles whose ``__reduce__`` creates a marker file, archives with pickled payloads)."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FEATURES = 6
IMAGE = (3, 8, 8)


def rows(count: int = 32, seed: int = 1) -> np.ndarray:
    """Float32 feature rows for the tree and sklearn models."""
    return np.random.default_rng(seed).standard_normal((count, FEATURES)).astype(np.float32)


def images(count: int = 4, seed: int = 1) -> np.ndarray:
    """Float32 images for the CNN."""
    return np.random.default_rng(seed).standard_normal((count, *IMAGE)).astype(np.float32)


# ---- PyTorch -----------------------------------------------------------------------------------------
def torch_cnn() -> Any:
    """Conv -> BatchNorm -> ReLU -> Linear, in eval mode, with non-trivial BatchNorm statistics."""
    torch = pytest.importorskip("torch", reason="needs the torch extra (make test installs it)")
    torch.manual_seed(0)

    class CNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 8 * 8, 5)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    model = CNN()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_pt2(path: Path, *, dynamic: bool = True) -> Any:
    """torch.export the CNN (batch dim dynamic or static) into ``path``; returns the eager model."""
    torch = pytest.importorskip("torch")
    model = torch_cnn()
    example = (torch.from_numpy(images(2)),)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    program = torch.export.export(model, example, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return model


def torch_outputs(model: Any, x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def rewrite_zip(path: Path, edit: Callable[[str, bytes], bytes | None], extra: dict[str, bytes] | None = None) -> None:
    """Rewrite a zip in place: ``edit(tail, data)`` returns new bytes or None to drop the member; ``extra``
    members (by tail) are added under the same root folder."""
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    root = members[0][0].split("/", 1)[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name, data in members:
            new = edit(name.split("/", 1)[1], data)
            if new is not None:
                out.writestr(name, new)
        for tail, data in (extra or {}).items():
            out.writestr(f"{root}/{tail}", data)


def edit_json(tail_wanted: str, change: Callable[[Any], None]) -> Callable[[str, bytes], bytes | None]:
    """An ``edit`` for :func:`rewrite_zip` that changes one JSON member."""

    def edit(tail: str, data: bytes) -> bytes:
        if tail != tail_wanted:
            return data
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()

    return edit


# ---- trees ---------------------------------------------------------------------------------------------
def xgboost_booster(objective: str = "multi:softprob") -> Any:
    xgb = pytest.importorskip("xgboost", reason="needs the sklearn extra (make test installs it)")
    x = rows(300, seed=0)
    label = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.3).astype(int)
    params: dict[str, Any] = {"objective": objective, "max_depth": 3, "seed": 0}
    if objective.startswith("multi"):
        params["num_class"] = 3
    target = x[:, 0] * 2 + x[:, 2] if objective.startswith("reg") else label
    return xgb.train(params, xgb.DMatrix(x, label=target), num_boost_round=15)


def lightgbm_booster() -> Any:
    lgb = pytest.importorskip("lightgbm", reason="needs the sklearn extra (make test installs it)")
    x = rows(300, seed=0)
    label = (x[:, 0] + x[:, 3] > 0).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": 0}
    return lgb.train(params, lgb.Dataset(x, label=label), num_boost_round=15)


# ---- TensorFlow ---------------------------------------------------------------------------------------
def keras_saved_model(folder: Path) -> Any:
    """A small Keras MLP exported as a SavedModel (``serving_default``: x [None, 6] -> output_0 [None, 3])."""
    tf = pytest.importorskip("tensorflow", reason="needs the tensorflow extra (make test installs it)")
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((FEATURES,), name="x")
    hidden = tf.keras.layers.Dense(16, activation="relu")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="softmax")(hidden))
    model.export(str(folder), verbose=False)
    return model


def tar_folder(folder: Path, arcname: str = "saved_model") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder, arcname=arcname)
    return buffer.getvalue()


# ---- scikit-learn -------------------------------------------------------------------------------------
def sklearn_pipeline() -> Any:
    pytest.importorskip("sklearn")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = rows(300, seed=0)
    label = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.3).astype(int)
    forest = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0)
    return make_pipeline(StandardScaler(), forest).fit(x, label)


# ---- hostile files ------------------------------------------------------------------------------------
class MarkerPayload:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.path),))


def marker_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": MarkerPayload(marker)})
