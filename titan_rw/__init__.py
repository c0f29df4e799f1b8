"""titan_rw: Llama pretraining on TorchTitan 0.3.0 with dynamic loss-based sample reweighting.

Importing the package applies the TorchTitan compatibility patches (`titan_rw.compat`)
before any torchtitan module can be imported. Keep this file light: no torchtitan import.
"""

from titan_rw import compat

compat.apply()

__version__ = "0.1.0"
