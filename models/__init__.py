"""Models: the VelocityModel protocol, the diffusers adapter, digits data, teacher and classifier."""

from models.digits import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES, Digits, load_digits
from models.velocity import DiffusersUNetVelocity, VelocityModel, check_velocity_model, load_model, save_model

__all__ = [
    "IMAGE_SHAPE",
    "NULL_LABEL",
    "NUM_CLASSES",
    "DiffusersUNetVelocity",
    "Digits",
    "VelocityModel",
    "check_velocity_model",
    "load_digits",
    "load_model",
    "save_model",
]
