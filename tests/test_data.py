"""certlab.data: synthetic geometry, real-file parsing, checksums, downloads (network replaced), directions."""

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import certlab.data as D
from certlab.data import cifar, download, idx
from certlab.errors import CertlabError, DataError, InputError
from certlab.threat import SegmentUnion

torch.manual_seed(0)

SHARED_MNIST = Path(os.environ.get("CERTLAB_TEST_MNIST")
                    or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
needs_mnist = pytest.mark.skipif(not all((SHARED_MNIST / f).is_file() for f in MNIST_FILES),
                                 reason=f"MNIST folder {SHARED_MNIST} not present (set CERTLAB_TEST_MNIST)")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test may reach the network: the fetch function fails unless a test replaces it."""
    def refuse(url, dest):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(download, "fetch", refuse)
    monkeypatch.delenv("CERTLAB_DATA", raising=False)


# ---------------------------------------------------------------- helpers writing standard-format files
def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes((0, 0, 8, arr.ndim)) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, n_train=12, n_test=7, gz=True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(arr)
            (folder / name).write_bytes(gzip.compress(data, mtime=0) if gz else data)
            out[name] = (folder / name).read_bytes()
    return out


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def write_manifest(folder: Path):
    (folder / "md5sums").write_text("".join(f"{md5(p.read_bytes())}  {p.name}\n"
                                            for p in sorted(folder.iterdir()) if p.name != "md5sums"))


def flip_byte(path: Path, at: int):
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


# ---------------------------------------------------------------- registry and errors
def test_names_params_and_errors():
    assert set(D.NAMES) == {"spheres", "linsep", "mnist", "fashion-mnist", "cifar10", "svhn", "digits"}
    with pytest.raises(CertlabError, match=r"unknown dataset 'imagenet'; valid: spheres.*mnist.*digits"):
        D.load("imagenet")
    with pytest.raises(CertlabError, match=r"unknown parameter radius for dataset 'spheres'.*r0"):
        D.load("spheres", radius=2)
    with pytest.raises(CertlabError, match=r"unknown split 'val'.*train, test"):
        D.load("spheres", split="val")
    with pytest.raises(InputError, match="n must be a positive integer"):
        D.load("linsep", n=0)
    with pytest.raises(InputError, match="contradicts"):
        D.load("spheres", r0=1.0, r1=1.5, margin=0.2)
    with pytest.raises(InputError, match="r1 must be >"):
        D.load("spheres", r0=1.0, r1=0.5)
    with pytest.raises(InputError, match="digits train has 1297 samples, n=5000"):
        D.load("digits", n=5000)


def test_info():
    m = D.info("mnist")
    assert (m.input_shape, m.num_classes, m.mean, m.std) == ((1, 28, 28), 10, (0.1307,), (0.3081,))
    assert D.info("fashion_mnist").mean == (0.2860,)
    c = D.info("cifar10")
    assert c.input_shape == (3, 32, 32) and c.std == (0.2470, 0.2435, 0.2616)
    assert D.info("svhn").input_shape == (3, 32, 32) and D.info("digits").input_shape == (1, 8, 8)
    s = D.info("spheres", d=7)
    assert s.input_shape == (7,) and s.num_classes == 2 and s.mean is None and s.domain is None


# ---------------------------------------------------------------- synthetic sets
@pytest.mark.parametrize("name", ["spheres", "linsep"])
def test_synthetic_shapes_determinism_independence(name):
    a = D.load(name, d=6, n=300, seed=3)
    assert a.x.shape == (300, 6) and a.x.dtype == torch.float32 and a.y.dtype == torch.int64
    assert set(a.y.tolist()) == {0, 1} and len(a) == 300 and "n=300" in repr(a)
    b = D.load(name, d=6, n=300, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, D.load(name, d=6, n=300, seed=4).x)
    t = D.load(name, "test", d=6, n=300, seed=3)
    # the test stream is its own: no shared point, and it does not depend on the training size
    assert torch.cdist(a.x, t.x).min() > 1e-4
    assert torch.equal(t.x[:50], D.load(name, "test", d=6, n=10_000, n_test=50, seed=3).x)
    assert torch.equal(a.x[:50], D.load(name, "train", d=6, n=50, seed=3).x)


@pytest.mark.parametrize("name", ["spheres", "linsep"])
def test_synthetic_class_balance(name):
    y = D.load(name, n=4000, seed=0).y.float()
    assert abs(y.mean().item() - 0.5) < 0.04  # 5 standard deviations of a fair coin mean


def test_spheres_radii_and_margin():
    ds = D.load("spheres", d=20, n=1000, r0=1.0, margin=0.25, seed=1)
    r = ds.x.double().norm(dim=1)
    target = torch.where(ds.y == 1, 1.25, 1.0).double()
    assert torch.allclose(r, target, atol=1e-6)
    # closest points of opposite classes are at least γ apart, and the radial gap is exactly γ
    x0, x1 = ds.x[ds.y == 0].double(), ds.x[ds.y == 1].double()
    assert torch.cdist(x0, x1).min() >= 0.25 - 1e-6
    assert abs((x1.norm(dim=1).min() - x0.norm(dim=1).max()).item() - 0.25) < 1e-6
    assert torch.allclose(D.load("spheres", r1=2.0).x.norm(dim=1).max(), torch.tensor(2.0))
    # directions are spread over the sphere (mean of unit vectors near 0)
    assert (ds.x / ds.x.norm(dim=1, keepdim=True)).mean(0).norm() < 0.15


def test_linsep_margin():
    ds = D.load("linsep", d=8, n=2000, margin=0.7, sigma=2.0, seed=5)
    assert torch.allclose(ds.x[:, 0], 0.7 * (2 * ds.y.float() - 1))
    assert abs(ds.x[:, 0].abs().min().item() - 0.7) < 1e-6  # distance to the hyperplane x1 = 0 is exactly γ
    assert abs(ds.x[:, 1:].std().item() - 2.0) < 0.1
    assert torch.equal(D.load("linsep", d=8, n=50, sigma=0.0).x[:, 1:], torch.zeros(50, 7))


# ---------------------------------------------------------------- digits
def test_digits_split():
    tr, te = D.load("digits"), D.load("digits", "test")
    assert (len(tr), len(te)) == (1297, 500)
    assert tr.x.shape[1:] == (1, 8, 8) and tr.x.min() >= 0 and tr.x.max() == 1.0
    assert te.y.bincount().tolist() == [50] * 10
    assert torch.equal(D.load("digits", "test").x, te.x)
    assert len(D.load("digits", n=100)) == 100


# ---------------------------------------------------------------- IDX files (generated)
def test_idx_fake_folder_root_and_env(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "mnist")
    ds = D.load("mnist", root=tmp_path / "mnist")  # root holding the files directly
    assert len(ds) == 12 and ds.x.shape == (12, 1, 28, 28) and ds.verified == "structure"
    assert ds.y.tolist() == [i % 10 for i in range(12)]
    monkeypatch.setenv("CERTLAB_DATA", str(tmp_path))  # root/mnist
    t = D.load("mnist", "test")
    assert len(t) == 7 and t.x.max() <= 1 and t.x.min() >= 0
    write_fake_mnist(tmp_path / "raw", gz=False)  # uncompressed IDX works the same
    assert torch.equal(D.load("mnist", root=tmp_path / "raw").x, ds.x)


def test_idx_truncated_and_garbled(tmp_path):
    write_fake_mnist(tmp_path, gz=True)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    full = f.read_bytes()
    f.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        D.load("mnist", "test", root=tmp_path)
    f.write_bytes(full)
    flip_byte(f, len(full) // 2)  # inside the deflate stream: zlib or CRC error
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        D.load("mnist", "test", root=tmp_path)
    # a well-formed gzip around a short IDX payload
    raw = gzip.decompress(full)
    f.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: header declares .*truncated"):
        D.load("mnist", "test", root=tmp_path)
    f.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]))
    with pytest.raises(DataError, match="magic"):
        D.load("mnist", "test", root=tmp_path)
    f.write_bytes(full)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(6))))
    with pytest.raises(DataError, match="7 images but .* 6 labels"):
        D.load("mnist", "test", root=tmp_path)


def test_checksum_listed_in_md5sums(tmp_path):
    write_fake_mnist(tmp_path)
    write_manifest(tmp_path)
    assert D.load("mnist", root=tmp_path).verified == "md5sums"
    f = tmp_path / "train-labels-idx1-ubyte.gz"
    flip_byte(f, 4)  # gzip header mtime: the payload still decodes, only the checksum can tell
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: md5 .* does not match"):
        D.load("mnist", root=tmp_path)


# ---------------------------------------------------------------- downloads (fetch replaced)
def test_download_success_records_md5(tmp_path, monkeypatch):
    files = write_fake_mnist(tmp_path / "src")
    for name, data in files.items():
        monkeypatch.setitem(idx._MD5["mnist"], name, md5(data))
    calls = []

    def fake_fetch(url, dest):
        calls.append(url)
        Path(dest).write_bytes(files[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(download, "fetch", fake_fetch)
    ds = D.load("mnist", "test", root=tmp_path / "cache")
    assert len(ds) == 7 and ds.verified == "official md5" and len(calls) == 2
    folder = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == ["md5sums", "t10k-images-idx3-ubyte.gz",
                                                         "t10k-labels-idx1-ubyte.gz"]
    assert download.read_manifest(folder)["t10k-images-idx3-ubyte.gz"] == md5(files["t10k-images-idx3-ubyte.gz"])
    D.load("mnist", "test", root=tmp_path / "cache")
    assert len(calls) == 2  # present now: no second download


def test_download_wrong_md5_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch", lambda url, dest: Path(dest).write_bytes(b"not mnist"))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*md5 .* not the official 9fb629c4"):
        D.load("mnist", "test", root=tmp_path)
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == []  # nothing half-written left behind


def test_missing_files_without_network(tmp_path):
    with pytest.raises(DataError) as e:
        D.load("fashion-mnist", "train", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "fashion-mnist") in msg and "network disabled" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg and "\n" not in msg
    with pytest.raises(DataError, match=r"train_32x32\.mat not found in .*svhn"):
        D.load("svhn", root=tmp_path, download=False)
    with pytest.raises(DataError, match=r"test_batch into .*cifar-10-batches-py.*cifar-10-python\.tar\.gz"):
        D.load("cifar10", "test", root=tmp_path)


# ---------------------------------------------------------------- shared MNIST (reduced training set)
@needs_mnist
def test_shared_mnist(monkeypatch):
    tr = D.load("mnist", root=SHARED_MNIST)
    assert len(tr) == 5000 and tr.y.bincount().tolist() == [500] * 10 and "n=5000" in repr(tr)
    monkeypatch.setenv("CERTLAB_DATA", str(SHARED_MNIST.parent))
    te = D.load("mnist", "test")
    assert len(te) == 10000 and te.verified == "official md5" and te.x.shape == (10000, 1, 28, 28)
    assert te.x.dtype == torch.float32 and te.x.min() == 0 and te.x.max() == 1
    assert te.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels
    assert abs(te.x.mean().item() - 0.1325) < 0.002
    assert len(D.load("mnist", "test", n=64)) == 64


@needs_mnist
def test_shared_mnist_flipped_copy(tmp_path):
    for f in MNIST_FILES + ["md5sums"]:
        shutil.copy(SHARED_MNIST / f, tmp_path / f)
        os.chmod(tmp_path / f, 0o644)
    flip_byte(tmp_path / "t10k-labels-idx1-ubyte.gz", 2000)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: md5"):
        D.load("mnist", "test", root=tmp_path)
    (tmp_path / "md5sums").unlink()  # without the list, the gzip CRC still catches it
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        D.load("mnist", "test", root=tmp_path)
    shutil.copy(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="official mnist file, not fashion-mnist"):
        D.load("fashion-mnist", "test", root=tmp_path)


# ---------------------------------------------------------------- CIFAR-10 and SVHN (generated)
def write_fake_cifar(folder: Path, n=4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name in cifar.FILES["train"] + cifar.FILES["test"]:
        batch = {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, n)],
                 "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "filenames": ["a.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_batches_and_safe_unpickling(tmp_path):
    write_fake_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    tr = D.load("cifar10", root=tmp_path)
    assert tr.x.shape == (20, 3, 32, 32) and tr.y.dtype == torch.int64 and tr.verified == "structure"
    raw = pickle.loads((tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2").read_bytes())
    assert torch.equal(tr.x[4] * 255, torch.from_numpy(raw["data"][0].reshape(3, 32, 32).astype(np.float32)))
    te_path = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    te_path.write_bytes(pickle.dumps({"data": _Evil(), "labels": []}))
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR batch.*refusing global"):
        D.load("cifar10", "test", root=tmp_path)
    write_fake_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    te_path.write_bytes(te_path.read_bytes()[:5000])
    with pytest.raises(DataError, match="test_batch"):
        D.load("cifar10", "test", root=tmp_path)


def test_cifar_download_extracts_archive(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cifar-10-batches-py"
    write_fake_cifar(src, n=3)
    archive = tmp_path / "src" / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
    blob = archive.read_bytes()
    monkeypatch.setattr(cifar, "ARCHIVE", download.Remote(cifar.ARCHIVE.name, cifar.ARCHIVE.urls, md5(blob)))
    monkeypatch.setattr(cifar, "MD5", {p.name: md5(p.read_bytes()) for p in src.iterdir()})
    monkeypatch.setattr(download, "fetch", lambda url, dest: Path(dest).write_bytes(blob))
    te = D.load("cifar10", "test", root=tmp_path / "data")
    assert len(te) == 3 and te.verified == "official md5"
    assert not (tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz").exists()


def test_svhn_mat(tmp_path):
    import scipy.io

    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, (32, 32, 3, 5)).astype(np.uint8)
    y = np.array([[1], [10], [3], [10], [9]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": X, "y": y})
    ds = D.load("svhn", "test", root=tmp_path)
    assert ds.x.shape == (5, 3, 32, 32) and ds.y.tolist() == [1, 0, 3, 0, 9]
    assert torch.equal(ds.x[2, 1] * 255, torch.from_numpy(X[:, :, 1, 2].astype(np.float32)))
    p = tmp_path / "svhn" / "test_32x32.mat"
    p.write_bytes(p.read_bytes()[:4000])
    with pytest.raises(DataError, match=r"test_32x32\.mat"):
        D.load("svhn", "test", root=tmp_path)


# ---------------------------------------------------------------- signal directions
def test_random_orthonormal_directions():
    d = D.signal_directions("mnist", k=5, seed=1)
    assert d.shape == (5, 1, 28, 28) and d.dtype == torch.float32
    flat = d.reshape(5, -1).double()
    assert torch.allclose(flat @ flat.T, torch.eye(5, dtype=torch.float64), atol=1e-6)
    assert torch.equal(d, D.signal_directions("mnist", k=5, seed=1))
    assert (d - D.signal_directions("mnist", k=5, seed=2)).abs().max() > 0.01
    x = D.load("linsep", d=6, n=4).x
    v = D.signal_directions("linsep", k=6, seed=0, x=x)
    assert v.shape == (6, 6) and torch.allclose(v @ v.T, torch.eye(6), atol=1e-5)
    with pytest.raises(InputError, match="k=7"):
        D.signal_directions("linsep", k=7, x=x)
    s = SegmentUnion(d, 0.1)
    assert s.directions_for(torch.zeros(2, 1, 28, 28)).shape == (2, 5, 784)


def test_spheres_radial_directions():
    ds = D.load("spheres", d=5, n=8, seed=2)
    d = D.signal_directions(ds)
    assert d.shape == (8, 1, 5)
    assert torch.allclose(d[:, 0] * ds.x.norm(dim=1, keepdim=True), ds.x, atol=1e-6)
    assert torch.allclose(d.norm(dim=-1), torch.ones(8, 1))
    # moving by β along the signal direction changes the radius by exactly β
    s = SegmentUnion(d, 0.3)
    z = s.points(ds.x, torch.zeros(8, dtype=torch.long), torch.full((8,), 0.3))
    assert torch.allclose(z.norm(dim=1) - ds.x.norm(dim=1), torch.full((8,), 0.3), atol=1e-5)
    with pytest.raises(InputError, match="pass the batch x"):
        D.signal_directions("spheres")
    # k > 1: the radial direction first, then k - 1 directions orthogonal to it and to each other
    dk = D.signal_directions("spheres", k=3, seed=1, x=ds.x)
    assert dk.shape == (8, 3, 5) and torch.allclose(dk[:, 0], d[:, 0], atol=1e-6)
    assert torch.allclose(dk @ dk.transpose(1, 2), torch.eye(3).expand(8, 3, 3), atol=1e-5)
    assert torch.equal(dk, D.signal_directions("spheres", k=3, seed=1, x=ds.x))
    assert not torch.allclose(dk, D.signal_directions("spheres", k=3, seed=2, x=ds.x))
    with pytest.raises(InputError, match="k=6"):
        D.signal_directions("spheres", k=6, x=ds.x)
