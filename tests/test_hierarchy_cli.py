"""``c2f hierarchy`` and ``c2f compress``: the library halves directly, then the commands end to end on
tiny CIFAR-100 pickles (the real on-disk format) written under ``tmp_path``."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from coarse2fine import recipes as B
from coarse2fine.cli import main
from coarse2fine.cli.hierarchy import print_hierarchy_report
from coarse2fine.compress import compress_model, compression_of, load_compressed_state
from coarse2fine.config import HDCNNConfig, load_config, to_dict
from coarse2fine.hierarchy import Hierarchy
from coarse2fine.models import register_model, unregister_model
from coarse2fine.recipes import load_trained
from coarse2fine.recipes.compress import compressed_checkpoint
from coarse2fine.recipes.hierarchy import learn_from_probs, write_hierarchy

FINE = ["apple", "pear", "rose", "tulip", "bus", "train"]
COARSE = ["fruit", "flowers", "vehicles"]  # fine f belongs to coarse f // 2


def test_learn_and_save_writes_everything(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    groups = np.arange(6) // 2
    targets = np.repeat(np.arange(6), 30)
    probs = np.full((targets.size, 6), 0.002) + 0.2 * (groups[targets][:, None] == groups[None, :])
    probs[np.arange(targets.size), targets] += 0.15
    probs *= rng.uniform(0.3, 1.7, probs.shape)
    probs /= probs.sum(1, keepdims=True)
    reference = {c: FINE[2 * i : 2 * i + 2] for i, c in enumerate(COARSE)}
    h = learn_from_probs(probs, targets, FINE, HDCNNConfig(num_coarse=3, clustering="spectral"), seed=0)
    report = write_hierarchy(h, probs, targets, tmp_path / "out", reference=reference)
    assert report["reference"]["scores"]["ari"] == 1.0
    assert sorted(map(sorted, report["groups"])) == sorted(map(sorted, reference.values()))
    h = Hierarchy.load(tmp_path / "out" / "hierarchy.json", class_names=FINE)
    assert h.num_coarse == 3
    assert (tmp_path / "out" / "hierarchy.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "hierarchy_report.json").read_text())
    assert saved["groups"] == report["groups"]
    assert report["quality"]["confusion_kept"] == pytest.approx(1.0) and report["selection"] is None
    assert saved["quality"] == report["quality"] and h.meta["quality"] == report["quality"]
    print_hierarchy_report(report)
    text = capsys.readouterr().out
    assert "ARI 1.000" in text and "apple" in text
    assert "confusion kept inside the groups: 100.0 % of the off-diagonal (normalised cut" in text
    # the default method records its candidates; the report and the printout carry them
    h = learn_from_probs(probs, targets, FINE, HDCNNConfig(num_coarse=3, clustering="auto"), seed=0)
    report = write_hierarchy(h, probs, targets, tmp_path / "auto")
    assert report["method"] == "auto" and report["selection"]["chosen"] == h.meta["selection"]["chosen"]
    print_hierarchy_report(report)
    text = capsys.readouterr().out
    assert f"method auto: chose {report['selection']['chosen']} among" in text
    assert "  agglomerative: kept 100.0 %, normalised cut" in text
    # a hierarchy saved before its meta had the quality gets it computed for the report and the picture
    old = replace(h, meta={k: v for k, v in h.meta.items() if k not in ("quality", "selection")})
    quality = write_hierarchy(old, probs, targets, tmp_path / "old")["quality"]
    assert quality["confusion_kept"] == pytest.approx(report["quality"]["confusion_kept"])
    assert quality["ncut"] == pytest.approx(report["quality"]["ncut"])


def test_compressed_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 6))
    ckpt = {"model": net.state_dict(), "optimizer": {"state": {}}, "config": {}, "classes": FINE, "metadata": {}}
    report = compress_model(net, {"1": (4, 16)})
    out = compressed_checkpoint(ckpt, net, report)
    assert "optimizer" not in out and compression_of(out) == {"1": [4, 16]}
    torch.save(out, tmp_path / "pq.pt")
    back = torch.load(tmp_path / "pq.pt", weights_only=True)
    fresh = load_compressed_state(nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 6)), back)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fresh.eval()(x), net.eval()(x))


# ---- end to end through the integration layer ------------------------------------------------------


def write_cifar100(root: Path, n_train: int = 120, n_test: int = 36) -> Path:
    """``cifar-100-python/{train,test,meta}`` pickles; each class has its own mean colour."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % len(FINE)
        base = (fine[:, None] * 40 + 20).astype(np.int64)
        data = np.clip(base + rng.integers(-20, 20, size=(n, 3072)), 0, 255).astype(np.uint8)
        batch = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 2).tolist(),
            b"data": data,
        }
        with open(folder / split, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": FINE, "coarse_label_names": COARSE}, fh, protocol=2)
    return folder


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 6, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Iterator[Path]:
    """A checkpoint in the engine's format for a small net registered in the model factory."""
    tmp_path = tmp_path_factory.mktemp("cli")
    register_model("test_tiny_net", lambda **kw: TinyNet(**kw), replace=True)
    yield _make_checkpoint(tmp_path)
    unregister_model("test_tiny_net")


def _make_checkpoint(tmp_path: Path) -> Path:

    write_cifar100(tmp_path / "data")
    cfg = load_config(
        None,
        [
            "name=tiny",
            "model.name=test_tiny_net",
            f"out_dir={tmp_path / 'runs'}",
            "data.name=cifar100",
            f"data.root={tmp_path / 'data'}",
            "data.val_fraction=0.3",
            "data.workers=0",
            "data.batch_size=16",
            "train.device=cpu",
            "hdcnn.num_coarse=3",
        ],
    )
    bundle = B.build_datasets(cfg)
    model = B.build_model_and_objective(cfg, bundle.facts())[0]
    torch.manual_seed(0)
    # a quick fit so that the block's mistakes mean something
    loaders = B.build_loaders(cfg, bundle)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(3):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    path = tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": 3,
            "config": to_dict(cfg),
            "classes": bundle.classes,
            "metadata": bundle.facts().to_dict(),
        },
        path,
    )
    return path


def test_c2f_hierarchy_end_to_end(trained_checkpoint, tmp_path, capsys) -> None:
    rc = main(["hierarchy", "--checkpoint", str(trained_checkpoint), "--quiet", "--gamma", "3"])
    assert rc == 0
    run_dir = trained_checkpoint.parent.parent
    h = Hierarchy.load(run_dir / "hierarchy.json", class_names=FINE)
    assert h.num_coarse == 3 and h.meta["gamma"] == 3.0
    assert (run_dir / "hierarchy.png").is_file()
    report = json.loads((run_dir / "hierarchy_report.json").read_text())
    assert report["num_heldout"] > 0
    assert report["reference"]["scores"]["reference_num_coarse"] == 3  # CIFAR-100's own coarse labels
    out = capsys.readouterr().out
    assert "ARI" in out and "apple" in out
    # another K and an explicit reference file, into another folder
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"a": FINE[:3], "b": FINE[3:]}))
    rc = main(
        [
            "hierarchy",
            "--checkpoint",
            str(trained_checkpoint),
            "--num-coarse",
            "2",
            "--reference",
            str(ref),
            "--out",
            str(tmp_path / "h2"),
            "--method",
            "auto",
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "confusion kept inside the groups" in out and "method auto: chose" in out
    assert Hierarchy.load(tmp_path / "h2" / "hierarchy.json").meta["selection"]["candidates"]
    assert (
        json.loads((tmp_path / "h2" / "hierarchy_report.json").read_text())["reference"]["scores"][
            "reference_num_coarse"
        ]
        == 2
    )


def test_c2f_hierarchy_bad_input(trained_checkpoint, tmp_path, capsys) -> None:
    assert main(["hierarchy", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main(["hierarchy", "--checkpoint", str(trained_checkpoint), "--num-coarse", "9", "--quiet"]) == 2
    assert "K=9" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(["hierarchy", "--checkpoint", str(trained_checkpoint), "--reference", str(bad), "--quiet"]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_c2f_compress_end_to_end(trained_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "pq.pt"
    rc = main(
        [
            "compress",
            "--checkpoint",
            str(trained_checkpoint),
            "--layers",
            "classifier.1=4:16",
            "--out",
            str(out),
            "--eval",
            "--quiet",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "classifier.1" in text and "test top-1" in text and "bytes" in text
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["model"]["classifier.1.codes"].dtype == torch.uint8
    assert "optimizer" not in ckpt and compression_of(ckpt) == {"classifier.1": [4, 16]}
    assert set(ckpt["compression_eval"]) == {"before", "after"}
    # the compressed checkpoint loads back and gives the same accuracy
    trained = load_trained(out)
    model, classes = trained.model, trained.classes
    assert classes == FINE and hasattr(model.classifier[1], "codes")
    # compressing twice, or over the input, is refused
    assert main(["compress", "--checkpoint", str(out), "--auto"]) == 2
    assert "already compressed" in capsys.readouterr().err
    assert main(["compress", "--checkpoint", str(trained_checkpoint), "--auto", "--out", str(trained_checkpoint)]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["compress", "--checkpoint", str(trained_checkpoint), "--layers", "nope=4:16"]) == 2
    assert "no layer named 'nope'" in capsys.readouterr().err
    assert main(["compress", "--checkpoint", str(trained_checkpoint), "--layers", "classifier.1"]) == 2
    assert "NAME=S:K" in capsys.readouterr().err


def test_c2f_compress_auto_rule_options(trained_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "pq_axis.pt"
    args = ["compress", "--checkpoint", str(trained_checkpoint), "--auto", "--axis", "columns"]
    assert main([*args, "--linear", "4:8", "--out", str(out), "--quiet"]) == 0
    assert "columns" in capsys.readouterr().out
    spec = compression_of(torch.load(out, weights_only=True))
    assert spec and all(sk[2] == "columns" and sk[1] <= 8 for sk in spec.values())
    model = load_trained(out).model  # the transposed codes load back into their layers
    assert all(getattr(m, "axis", "columns") == "columns" for m in model.modules() if hasattr(m, "codes"))
    assert main([*args, "--linear", "4", "--out", str(tmp_path / "x.pt")]) == 2
    assert "NAME=S:K" in capsys.readouterr().err
    assert main([*args, "--rear", "--out", str(tmp_path / "y.pt")]) == 2
    assert "--rear needs an HD-CNN" in capsys.readouterr().err
