"""The methods wing: one short module per method, and their registry, a plain dict from the name users
type to the class. Adding one: write its module, import its class and add an entry below.

A method may import the building blocks (``heads.blocks``: batches, standardisation, modules,
optimizers), ``heads.metrics`` and ``heads.errors``, and other methods it subclasses; never the
training core (``heads.train``), the sweeps or the reports, which sit above it.
"""
from __future__ import annotations

from heads.errors import OptionError
from heads.methods.agm import AGM
from heads.methods.amco import AMCo
from heads.methods.base import HeadMethod
from heads.methods.bigated import BiGated
from heads.methods.ccat import CCAT
from heads.methods.cml import CML
from heads.methods.concat import Concat
from heads.methods.crmt import CRMT
from heads.methods.dimml import DIMML
from heads.methods.edm import EDM
from heads.methods.film import FiLM
from heads.methods.gblend import GBlend
from heads.methods.greedy import Greedy
from heads.methods.late import Late
from heads.methods.lfm import LFM
from heads.methods.mbsd import MBSD
from heads.methods.mla import MLA
from heads.methods.mmcosine import MMCosine
from heads.methods.mmpareto import MMPareto
from heads.methods.mses import MSES
from heads.methods.mslr import MSLR
from heads.methods.ogm import OGM
from heads.methods.ogm_ge import OGMGE
from heads.methods.opm import OPM
from heads.methods.pmr import PMR
from heads.methods.qmf import QMF
from heads.methods.relearn import Relearn
from heads.methods.sum import Sum
from heads.methods.valuation import Valuation
from heads.methods.reconboost import ReconBoost
from heads.methods.sum import Sum
from heads.methods.umt import UMT

METHODS: dict[str, type[HeadMethod]] = {
    "concat": Concat,
    "sum": Sum,
    "late": Late,
    "film": FiLM,
    "bigated": BiGated,
    "ogm-ge": OGMGE,
    "ogm": OGM,
    "qmf": QMF,
    "mla": MLA,
    "ccat": CCAT,
    "edm": EDM,
    "mmpareto": MMPareto,
    "lfm": LFM,
    "crmt": CRMT,
    "mmcosine": MMCosine,
    "cml": CML,
    "mbsd": MBSD,
    "mslr": MSLR,
    "mses": MSES,
    "pmr": PMR,
    "agm": AGM,
    "opm": OPM,
    "amco": AMCo,
    "relearn": Relearn,
    "dimml": DIMML,
    "valuation": Valuation,
    "gblend": GBlend,
    "greedy": Greedy,
    "umt": UMT,
    "reconboost": ReconBoost,
}


def method_class(name: str) -> type[HeadMethod]:
    """The class registered as ``name``; an unknown name is an ``OptionError`` listing the known ones."""
    if name not in METHODS:
        raise OptionError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
