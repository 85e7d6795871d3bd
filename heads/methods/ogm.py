"""``ogm``: OGM-GE without GE — the on-the-fly gradient modulation alone (Peng et al., CVPR 2022).

The EDM paper's Table I lists it as its own row. Everything is ``ogm-ge`` (``heads/methods/ogm_ge.py``:
scores eqs. 6–8, coefficient eq. 10, modulation window, SGD protocol of the official main.py) with
``--ge`` off by default: inside the window each projection's weight gradient becomes exactly ``k_m · g``
(eq. 9), no Gaussian noise (eq. 11 dropped). The official code has this mode as ``--modulation OGM``
(``grad *= coeff``; GeWu-Lab/OGM-GE_CVPR2022 main.py, and MLA's main.py). ``--ge`` turns it back into
``ogm-ge``.

The T-PAMI 2024 form (BML_TPAMI2024 ``--modulation OGM``) and its OGM+ (``--plus 4``) are options of
both: see ``ogm_ge.py``'s docstring for the flags (warm-up, window, AdamW protocol).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from heads.methods.ogm_ge import OGMGE, OGMOptions


@dataclass
class OGMOnlyOptions(OGMOptions):
    ge: bool = field(default=False, metadata={"help": "add GE's Gaussian noise (off: OGM alone; on: ogm-ge)"})


class OGM(OGMGE):
    Options = OGMOnlyOptions
    summary = "concat with on-the-fly gradient modulation only (OGM-GE without GE)"
