"""Dataset loaders on tiny files written in each dataset's real on-disk format; splits; offline sets."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.flowers102
from PIL import Image

from applications.bissl.augment import eval_transform
from applications.bissl.data import (
    DATASETS,
    PAPER_DATASETS,
    LabeledDataset,
    dataset_info,
    few_label_subset,
    get_dataset,
    num_classes,
    prepare_fashion_mnist,
    train_val_split,
)

RNG = np.random.default_rng(0)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- CIFAR-10 (pickles)


def _write_cifar10(root: Path, per_batch: int = 2) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = RNG.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, f)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return written


def test_cifar10_pickled_batches(tmp_path, monkeypatch) -> None:
    written = _write_cifar10(tmp_path)
    # our files cannot match the md5 sums of the real archive; everything else is torchvision's code
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train = get_dataset("cifar10", tmp_path, "train")
    test = get_dataset("CIFAR10", tmp_path, "test")
    assert len(train) == 10 and len(test) == 2 and train.num_classes == 10 and train.classes[0] == "airplane"
    expected_labels = [t for i in range(1, 6) for t in written[f"data_batch_{i}"][1]]
    assert train.targets.tolist() == expected_labels
    img, label = test[1]
    data, labels = written["test_batch"]
    assert label == labels[1]
    np.testing.assert_array_equal(np.asarray(img), data[1].reshape(3, 32, 32).transpose(1, 2, 0))
    x, _ = get_dataset("cifar10", tmp_path, "test", transform=eval_transform(16, 3))[0]
    assert x.shape == (3, 16, 16)


def test_missing_files_never_download(tmp_path, monkeypatch) -> None:
    import applications.bissl.data.offline as offline

    monkeypatch.setattr(offline, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-copy")
    with pytest.raises(RuntimeError, match="not found"):
        get_dataset("cifar10", tmp_path / "nothing", "train")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        from applications.bissl.data import fashion_mnist

        fashion_mnist(tmp_path / "nothing")  # no download attempted
    assert not any((tmp_path / "nothing").rglob("*ubyte*"))


# ----------------------------------------------------------------------------- Fashion-MNIST (idx .gz)


def _idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_fashion_gz(folder: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        payload = _idx_images(arr) if "images" in name else _idx_labels(arr)
        with gzip.open(folder / f"{name}.gz", "wb") as f:
            f.write(payload)
    return arrays


def test_fashion_mnist_from_idx_gz_in_raw_folder(tmp_path) -> None:
    arrays = _write_fashion_gz(tmp_path / "FashionMNIST" / "raw")
    train = get_dataset("fashion_mnist", tmp_path, "train")
    test = get_dataset("FashionMNIST", tmp_path, "test")
    assert (len(train), len(test), train.num_classes) == (6, 4, 10)
    assert train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    img, label = test[2]
    assert img.mode == "L" and label == int(arrays["t10k-labels-idx1-ubyte"][2])
    np.testing.assert_array_equal(np.asarray(img), arrays["t10k-images-idx3-ubyte"][2])


def test_fashion_mnist_copied_from_a_system_folder(tmp_path) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = _write_fashion_gz(system, n_train=3, n_test=2)
    raw = prepare_fashion_mnist(tmp_path / "root", system_dir=system)
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)
    ds = get_dataset("fashion_mnist", tmp_path / "root", "train")
    np.testing.assert_array_equal(np.asarray(ds[0][0]), arrays["train-images-idx3-ubyte"][0])


# ----------------------------------------------------------------------------- image folders


def test_image_folder(tmp_path) -> None:
    pixels = {}
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            for i in range(n):
                arr = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
                _png(tmp_path / split / cls / f"{i}.png", arr)
                pixels[(split, cls, i)] = arr
    train = get_dataset("imagefolder", tmp_path, "train")
    assert train.classes == ["cat", "dog"] and train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    img, label = train[4]
    assert label == 1
    np.testing.assert_array_equal(np.asarray(img), pixels[("train", "dog", 1)])
    assert len(get_dataset("imagefolder", tmp_path, "test")) == 2
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "train").rename(tmp_path / "imagenet" / "train")
    (tmp_path / "test").rename(tmp_path / "imagenet" / "val")  # ImageNet's val serves as "test"
    assert get_dataset("imagenet", tmp_path, "test").targets.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError, match="image folder split not found"):
        get_dataset("imagefolder", tmp_path, "val")


def test_cub200_official_layout(tmp_path) -> None:
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows, labels, split = [], [], []
    for k in range(4):
        cls = classes[k % 2]
        rel = f"{cls}/img_{k}.jpg"
        _png(base / "images" / rel, RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        rows.append(f"{k + 1} {rel}")
        labels.append(f"{k + 1} {k % 2 + 1}")
        split.append(f"{k + 1} {1 if k < 3 else 0}")
    (base / "images.txt").write_text("\n".join(rows) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)) + "\n")
    train = get_dataset("cub200", tmp_path, "train")
    test = get_dataset("cub200", tmp_path, "test")
    assert train.targets.tolist() == [0, 1, 0] and test.targets.tolist() == [1]
    assert train.classes == classes and train[0][0].mode == "RGB"


def test_dtd_train_is_train_plus_val(tmp_path) -> None:
    data = tmp_path / "dtd" / "dtd"
    classes = ["banded", "dotted"]
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for cls in classes:
            for i in range(n):
                name = f"{cls}_{split}_{i}.jpg"
                _png(data / "images" / cls / name, RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8))
                lines[split].append(f"{cls}/{name}")
    (data / "labels").mkdir()
    for split, rows in lines.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")
    train = get_dataset("dtd", tmp_path, "train")
    assert len(train) == 6 and train.targets.tolist() == [0, 0, 1, 1, 0, 1]
    assert len(get_dataset("dtd", tmp_path, "val")) == 2 and len(get_dataset("dtd", tmp_path, "test")) == 2
    assert train[5][1] == 1 and train[5][0].size == (6, 6)


def test_voc07_multilabel_targets(tmp_path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    objects = {"000001": ["dog", "person"], "000002": ["car"], "000003": ["dog", "dog"]}
    for img_id, names in objects.items():
        _png(voc / "JPEGImages" / f"{img_id}.jpg", RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8))
        body = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{img_id}.xml").write_text(
            f"<annotation><filename>{img_id}.jpg</filename>{body}</annotation>"
        )
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000003\n")
    train = get_dataset("voc07", tmp_path, "train")
    assert train.multilabel and train.num_classes == 20 and train.targets.shape == (2, 20)
    classes = train.classes
    expected = torch.zeros(2, 20)
    expected[0, classes.index("dog")] = expected[0, classes.index("person")] = 1
    expected[1, classes.index("car")] = 1
    torch.testing.assert_close(train.targets, expected)
    img, target = get_dataset("voc07", tmp_path, "test")[0]
    assert img.size == (7, 5) and target.sum() == 1 and target[classes.index("dog")] == 1


# ----------------------------------------------------------------------------- digits, registry


def test_digits_offline_split_and_pixels() -> None:
    from sklearn.datasets import load_digits

    train, test = get_dataset("digits", split="train", image_size=8), get_dataset("digits", split="test", image_size=8)
    assert len(train) + len(test) == 1797 and len(test) == 359
    counts = torch.bincount(test.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20%
    digits = load_digits()
    # at 8x8 no resampling happens: pixels are the originals scaled from 0..16 to 0..255
    original = sorted(map(bytes, np.clip(np.round(digits.images * 255 / 16), 0, 255).astype(np.uint8).reshape(-1, 64)))
    ours = sorted(np.asarray(ds.image(i)).tobytes() for ds in (train, test) for i in range(len(ds)))
    assert ours == original  # train and test partition the 1,797 images
    big = get_dataset("digits", split="test", image_size=32)
    assert big.image(0).size == (32, 32) and big.targets.tolist() == test.targets.tolist()


def test_registry_covers_the_paper_sets() -> None:
    assert set(PAPER_DATASETS) == {
        "food",
        "cars",
        "dtd",
        "pets",
        "flowers",
        "aircraft",
        "cifar10",
        "cifar100",
        "caltech101",
        "sun397",
        "voc07",
        "cub200",
    }
    assert set(PAPER_DATASETS) < set(DATASETS)
    assert num_classes("pets") == 37 and num_classes("Flowers102") == 102 and num_classes("fashion-mnist") == 10
    assert dataset_info("digits").channels == 1 and dataset_info("voc07").multilabel
    with pytest.raises(ValueError, match="unknown dataset 'imagenet9'"):
        get_dataset("imagenet9")
    with pytest.raises(ValueError, match="has splits"):
        get_dataset("digits", split="val")
    with pytest.raises(ValueError, match="no fixed class count"):
        num_classes("imagefolder")


# ----------------------------------------------------------------------------- splits


def _toy(n_per_class=(10, 6, 4)) -> LabeledDataset:
    targets = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    return LabeledDataset([(i, None) for i in range(len(targets))], targets, ["a", "b", "c"])


def test_train_val_split_is_seeded_disjoint_and_stratified() -> None:
    ds = _toy()
    tr, va = train_val_split(ds, 0.25, seed=5)
    tr2, va2 = train_val_split(ds, 0.25, seed=5)
    _, va3 = train_val_split(ds, 0.25, seed=6)
    assert torch.equal(va.indices, va2.indices) and torch.equal(tr.indices, tr2.indices)
    assert not torch.equal(va.indices, va3.indices)
    assert set(tr.indices.tolist()).isdisjoint(va.indices.tolist())
    assert sorted(tr.indices.tolist() + va.indices.tolist()) == list(range(len(ds)))
    assert torch.bincount(va.targets).tolist() == [2, 2, 1]  # round(0.25 * n) per class
    with pytest.raises(ValueError, match="fraction must lie in"):
        train_val_split(ds, 1.0)


def test_few_label_subset_counts_and_transforms() -> None:
    ds = _toy()
    few = few_label_subset(ds, per_class=5, seed=0)
    assert torch.bincount(few.targets).tolist() == [5, 5, 4]
    assert torch.equal(few.indices, few_label_subset(ds, per_class=5, seed=0).indices)
    assert torch.bincount(few_label_subset(ds, fraction=0.5, seed=0).targets).tolist() == [5, 3, 2]
    shifted = few.with_transform(lambda x: x + 1000)
    assert shifted[0][0] == few[0][0] + 1000 and few.transform is None
    with pytest.raises(ValueError, match="exactly one of"):
        few_label_subset(ds)
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        few_label_subset(ds, per_class=0)


# ----------------------------------------------------------------------------- more paper sets


def _jpg(path: Path) -> None:
    _png(path, RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8))


def test_pets_food_aircraft_official_splits(tmp_path) -> None:
    pets = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": ["Abyssinian_1 1 1 1", "beagle_2 2 2 1", "beagle_3 2 2 1"], "test": ["Abyssinian_4 1 1 1"]}
    for split, lines in rows.items():
        for line in lines:
            _jpg(pets / "images" / f"{line.split()[0]}.jpg")
        (pets / "annotations").mkdir(parents=True, exist_ok=True)
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    train = get_dataset("pets", tmp_path, "train")  # = the official trainval split
    assert train.targets.tolist() == [0, 1, 1] and train.classes == ["Abyssinian", "Beagle"]
    assert get_dataset("pets", tmp_path, "test").targets.tolist() == [0]

    food = tmp_path / "food-101"
    meta = {
        "train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
        "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5"]},
    }
    for split, classes in meta.items():
        for items in classes.values():
            for rel in items:
                _jpg(food / "images" / f"{rel}.jpg")
        (food / "meta").mkdir(parents=True, exist_ok=True)
        (food / "meta" / f"{split}.json").write_text(json.dumps(classes))
    assert get_dataset("Food101", tmp_path, "train").targets.tolist() == [0, 0, 1]
    assert len(get_dataset("food", tmp_path, "test")) == 2

    air = tmp_path / "fgvc-aircraft-2013b" / "data"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    splits = {"trainval": ["0001 707-320", "0002 A300B4"], "test": ["0003 A300B4"], "val": ["0002 A300B4"]}
    for split, lines in splits.items():
        for line in lines:
            _jpg(air / "images" / f"{line.split()[0]}.jpg")
        (air / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    assert get_dataset("aircraft", tmp_path, "train").targets.tolist() == [0, 1]
    assert get_dataset("aircraft", tmp_path, "val").targets.tolist() == [1]
    assert get_dataset("aircraft", tmp_path, "test").classes == ["707-320", "A300B4"]


def test_caltech101_and_sun397_seeded_80_20_split(tmp_path) -> None:
    cal = tmp_path / "caltech101" / "101_ObjectCategories"
    for cls, n in (("accordion", 5), ("airplanes", 10), ("BACKGROUND_Google", 2)):
        for i in range(1, n + 1):
            _jpg(cal / cls / f"image_{i:04d}.jpg")
    (tmp_path / "caltech101" / "Annotations").mkdir()
    train, test = get_dataset("caltech101", tmp_path, "train"), get_dataset("caltech101", tmp_path, "test")
    assert train.classes == ["accordion", "airplanes"]  # torchvision drops the background class
    assert torch.bincount(test.targets).tolist() == [1, 2] and torch.bincount(train.targets).tolist() == [4, 8]
    assert torch.equal(get_dataset("caltech101", tmp_path, "test").indices, test.indices)  # fixed seed

    sun = tmp_path / "SUN397"
    sun.mkdir()
    (sun / "ClassName.txt").write_text("/a/abbey\n/b/beach\n")
    for cls, n in (("a/abbey", 5), ("b/beach", 5)):
        for i in range(n):
            _jpg(sun / cls / f"sun_{cls[-1]}{i}.jpg")
    sun_train = get_dataset("sun397", tmp_path, "train")
    assert sun_train.classes == ["abbey", "beach"] and torch.bincount(sun_train.targets).tolist() == [4, 4]
    assert len(get_dataset("sun397", tmp_path, "test")) == 2


def test_flowers102_and_stanford_cars_mat_files(tmp_path, monkeypatch) -> None:
    from scipy.io import savemat

    flowers = tmp_path / "flowers-102"
    for i in range(1, 7):
        _jpg(flowers / "jpg" / f"image_{i:05d}.jpg")
    savemat(flowers / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 1, 2]])})  # 1-based classes
    savemat(
        flowers / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]), "tstid": np.array([[5, 6]])}
    )
    # our .mat files cannot match the md5 sums of the real ones; the rest is torchvision's code
    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", lambda *a, **k: True)
    train = get_dataset("flowers", tmp_path, "train")  # official train + val
    assert train.targets.tolist() == [0, 1, 0, 1] and len(get_dataset("flowers", tmp_path, "test")) == 2

    cars = tmp_path / "stanford_cars"
    record = np.dtype([("fname", object), ("class", object)])
    for folder, mat, rows in (
        ("cars_train", cars / "devkit" / "cars_train_annos.mat", [("00001.jpg", 2), ("00002.jpg", 1)]),
        ("cars_test", cars / "cars_test_annos_withlabels.mat", [("00003.jpg", 2), ("00004.jpg", 2)]),
    ):
        for name, _ in rows:
            _jpg(cars / folder / name)
        mat.parent.mkdir(parents=True, exist_ok=True)
        savemat(mat, {"annotations": np.array(rows, dtype=record)})
    savemat(
        cars / "devkit" / "cars_meta.mat", {"class_names": np.array(["AM General Hummer", "Acura RL"], dtype=object)}
    )
    cars_train = get_dataset("cars", tmp_path, "train")
    assert cars_train.targets.tolist() == [1, 0] and cars_train.classes == ["AM General Hummer", "Acura RL"]
    assert get_dataset("cars", tmp_path, "test").targets.tolist() == [1, 1]
