"""The model zoo: ``create_model(name, num_classes, in_channels)`` and the staged-model contract."""
from bench.models.base import Features, StagedNet, count_parameters
from bench.models.registry import create_model, is_known_model, list_models, register_model

# Importing the families registers them.
from bench.models import cifar, imagenet, timm_adapter  # noqa: F401,E402

__all__ = [
    "Features",
    "StagedNet",
    "count_parameters",
    "create_model",
    "is_known_model",
    "list_models",
    "register_model",
]
