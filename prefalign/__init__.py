"""prefalign: measure and improve how well text-to-image diffusion models match human preferences."""

__version__ = "0.1.0"
