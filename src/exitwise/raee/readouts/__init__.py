"""What an exit says: the label-word readout of a hidden state at a layer (see ``base.py``)."""

from exitwise.raee.readouts.base import READOUTS, Readout, fit_readout, load_readout

__all__ = ["READOUTS", "Readout", "fit_readout", "load_readout"]
