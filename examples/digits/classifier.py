"""A digit classifier trained on real digits: accuracy and Frechet-distance features."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.digits.data import NUM_CLASSES, load_digits
from flowpress.errors import FlowpressError
from flowpress.files import staged_dir

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """(B, 1, 16, 16) in [-1, 1] -> logits (B, 10); `embed` gives (B, 128) features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ClassifierConfig:
    out: str = "examples/digits/checkpoints/digits-classifier"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shifts of up to one pixel and a little noise, so samples near the data still classify."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    shifted = padded[:, :, dy : dy + 16, dx : dx + 16]
    return shifted + 0.05 * torch.randn(shifted.shape, generator=gen)


def train_classifier(config: ClassifierConfig, progress: bool = True) -> tuple[Path, float]:
    """Train on the digits train split; returns (checkpoint dir, held-out accuracy)."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train, test = load_digits("train"), load_digits("test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    n = len(train.labels)
    for _ in tqdm(range(config.epochs), desc="classifier", disable=not progress):
        model.train()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(_augment(train.images[index], gen)), train.labels[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    accuracy = classifier_accuracy(model, test.images, test.labels)
    from safetensors.torch import save_file

    out = Path(config.out)
    with staged_dir(out) as tmp:
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        meta = {"config": asdict(config), "heldout_accuracy": accuracy, "n_test": len(test.labels)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out, accuracy


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return float((predictions == labels).float().mean())


def load_classifier(path: str | Path) -> DigitClassifier:
    from safetensors.torch import load_file

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FlowpressError(f"{weights}: classifier weights missing; run `make classifier` to train them")
    model = DigitClassifier()
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:
        raise FlowpressError(
            f"{weights}: cannot load classifier ({type(err).__name__}); run `make classifier`"
        ) from None
    return model.eval()
