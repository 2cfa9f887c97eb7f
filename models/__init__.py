"""Models: the VelocityModel protocol, the diffusers adapter, digits data, teacher and classifier."""

from models.digits import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES, Digits, load_digits
from models.velocity import DiffusersVelocity, VelocityModel, check_velocity_model, load_model, save_model

__all__ = [
    "IMAGE_SHAPE",
    "NULL_LABEL",
    "NUM_CLASSES",
    "DiffusersVelocity",
    "Digits",
    "VelocityModel",
    "check_velocity_model",
    "load_digits",
    "load_model",
    "save_model",
]
