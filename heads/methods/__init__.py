"""The registry of head methods: a plain dict from the name users type to the class."""
from __future__ import annotations

from heads.methods.base import HeadMethod
from heads.methods.bigated import BiGated
from heads.methods.ccat import CCAT
from heads.methods.concat import Concat
from heads.methods.crmt import CRMT
from heads.methods.edm import EDM
from heads.methods.film import FiLM
from heads.methods.late import Late
from heads.methods.lfm import LFM
from heads.methods.mla import MLA
from heads.methods.mmpareto import MMPareto
from heads.methods.ogm import OGM
from heads.methods.ogm_ge import OGMGE
from heads.methods.qmf import QMF
from heads.methods.sum import Sum

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
}
