"""racnn: RA-CNN (Fu, Zheng, Mei, "Look Closer to See Better", CVPR 2017) for weakly supervised
fine-grained image recognition.

The Python API (docs/api.md)::

    import racnn

    model = racnn.create_model("mobilenet_v2", num_classes=200, pretrained=True)
    trainer = racnn.Trainer(racnn.load_config("configs/cub_mobilenet_v2_cpu.yaml"), "runs/cub")
    trainer.fit()
    model = racnn.load_model("runs/cub/best.pt")  # carries its classes and preprocessing
    racnn.predict(model, ["bird.jpg"])
"""

from typing import TYPE_CHECKING, Any

from .checkpoint import load_model
from .config import Config, load_config
from .inference import predict
from .model import RACNN, create_model

if TYPE_CHECKING:
    from .training.trainer import Trainer

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``racnn.Trainer`` on first use: importing racnn to predict or serve leaves the training stack out."""
    if name == "Trainer":
        from .training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'racnn' has no attribute {name!r}")


__all__ = [
    "RACNN",
    "Config",
    "Trainer",
    "__version__",
    "create_model",
    "load_config",
    "load_model",
    "predict",
]
