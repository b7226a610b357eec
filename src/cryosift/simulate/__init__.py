"""Simulated particle images with ground truth: projections, CTF, noise, junk."""

from cryosift.simulate.ctf import Optics, ctf_2d, electron_wavelength
from cryosift.simulate.orientations import euler_to_matrix, matrix_to_euler, random_orientations
from cryosift.simulate.projector import FourierProjector
from cryosift.simulate.simulator import SimulationConfig, SimulationResult, simulate
from cryosift.simulate.structure import Volume, load_atomic_model, load_density_map, model_to_volume

__all__ = [
    "FourierProjector",
    "Optics",
    "SimulationConfig",
    "SimulationResult",
    "Volume",
    "ctf_2d",
    "electron_wavelength",
    "euler_to_matrix",
    "load_atomic_model",
    "load_density_map",
    "matrix_to_euler",
    "model_to_volume",
    "random_orientations",
    "simulate",
]
