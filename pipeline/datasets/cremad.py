"""CREMA-D: 7442 clips of 91 actors saying 12 sentences in 6 emotions; audio and face video.

The release (the CREMA-D GitHub repository of Cao et al., 2014, files kept with git-lfs) has
``AudioWAV/<name>.wav`` and ``VideoFlash/<name>.flv`` with names ``1001_DFA_ANG_XX``: actor,
sentence, emotion, intensity. The label is the emotion, in the OGM-GE repository's order
NEU HAP SAD FEA DIS ANG, so label ids match the papers that start from that code.

Splits: ``split=random`` (default, stratified 80/10/10; actors are shared between splits, as in
the papers' 6698/744 split), ``split=actor`` (actor-disjoint: no actor's face or voice in two
splits), or the OGM-GE csvs as ``train_file=train.csv test_file=test.csv`` (rows ``name,LABEL``;
val carved from train).
"""
from __future__ import annotations

import re

from pipeline.datasets.base import DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped
from pipeline.datasets.files import file_problem
from pipeline.datasets.policy import SplitPolicy

CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
_NAME = re.compile(r"^(\d+)_([A-Z]+)_([A-Z]+)_([A-Z]+)$")


class CremaD(DatasetAdapter):
    name = "cremad"
    modalities = {"audio": "audio", "visual": "video"}
    class_names = CLASSES
    description = ("CREMA-D acted emotions (speech + face video), 6 classes, 91 actors; from the CREMA-D "
                   "GitHub repository (git-lfs). Random or actor-disjoint splits, OGM-GE csvs.")
    layout = ("AudioWAV/<actor>_<sentence>_<EMOTION>_<level>.wav and VideoFlash/<same name>.flv; options "
              "split=random|actor, seed, fractions (80/10/10), split_file, train_file+test_file (OGM-GE "
              "train.csv/test.csv), val_fraction")

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        self.policy = SplitPolicy(self.name, options, self.data_root, choices=("random", "group"), group="actor")
        missing = [d for d in ("AudioWAV", "VideoFlash") if not (self.data_root / d).is_dir()]
        if missing:
            raise DatasetError(f"cremad: {' and '.join(missing)} not found in {self.data_root} (the CREMA-D folder)")

    def listing(self) -> DatasetListing:
        audio_dir, video_dir = self.data_root / "AudioWAV", self.data_root / "VideoFlash"
        names = sorted({p.stem for p in audio_dir.glob("*.wav")} | {p.stem for p in video_dir.glob("*.flv")})
        samples, skipped, actors = [], [], {}
        for name in names:
            match = _NAME.match(name)
            if not match:
                skipped.append(Skipped(name, "file name is not ACTOR_SENTENCE_EMOTION_LEVEL"))
                continue
            actor, _, emotion, _ = match.groups()
            if emotion not in CLASSES:
                skipped.append(Skipped(name, f"emotion {emotion} is outside the scheme {' '.join(CLASSES)}"))
                continue
            audio, video = audio_dir / f"{name}.wav", video_dir / f"{name}.flv"
            problems = [f"{p.parent.name}/{p.name} is {why}" for p in (audio, video) if (why := file_problem(p))]
            if problems:
                skipped.append(Skipped(name, "; ".join(problems)))
                continue
            samples.append(SampleRef(name, CLASSES.index(emotion), "", {"audio": str(audio), "visual": str(video)}))
            actors[name] = actor
        return self.policy.listing(samples, skipped, groups=actors)
