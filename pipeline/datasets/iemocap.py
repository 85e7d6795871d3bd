"""IEMOCAP: dyadic acted dialogues of 5 sessions (two actors each), cut into labelled utterances.

The release (IEMOCAP_full_release, from USC SAIL under its license) has per session
``Session<n>/dialog/EmoEvaluation/<dialog>.txt`` with lines ``[start - end]<TAB>utterance<TAB>label
<TAB>[V, A, D]``, ``dialog/transcriptions/<dialog>.txt`` with lines ``utterance [start-end]: text``,
``dialog/wav/<dialog>.wav``, ``sentences/wav/<dialog>/<utterance>.wav`` and
``dialog/avi/DivX/<dialog>.avi``.

Modalities: ``text`` (the transcript line, read here), ``visual`` (K frames of the dialogue video
inside the utterance's time span) and ``audio`` (the same span of the dialogue's wav). Audio comes
from ``dialog/wav`` rather than ``sentences/wav`` because a sample has one time window
(``SampleRef.window``) that the extraction engine applies to every audio/video source: cut from
the dialogue recording, audio and frames cover exactly the same span (the dialogue wav's two
channels are mixed to mono).

Classes: ``classes=4`` (default): hap (with exc merged into it), sad, neu, ang -> 5531 utterances;
``classes=6``: hap, sad, neu, ang, exc, fru, the order of the 6-class IEMOCAP convention of the
conversational emotion papers (DialogueRNN and its successors). Every other label (xxx, oth, sur,
fea, dis, and fru for 4 classes) is skipped with its reason.

Splits: ``split=random`` (default, stratified 60/20/20 as in the MLA paper), ``split=session``
(session-disjoint, stratified), ``split=loso`` (leave one session out: ``test_session=5`` and
``val_session=4``, or val carved from the other sessions with ``val_fraction``).
"""
from __future__ import annotations

import re

from pipeline.datasets.base import DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped
from pipeline.datasets.files import file_problem, read_text
from pipeline.datasets.policy import SplitPolicy, parse_choice

SIX = ["hap", "sad", "neu", "ang", "exc", "fru"]
FOUR = ["hap", "sad", "neu", "ang"]
_EVAL = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[")
_TRANSCRIPT = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s?(.*)$")
_SESSION = re.compile(r"^Session(\d+)$")


class Iemocap(DatasetAdapter):
    """``class_names`` is the 4-class list on the class (what ``cli.py datasets`` shows); an instance
    made with ``classes=6`` carries the 6-class list instead."""

    name = "iemocap"
    modalities = {"audio": "audio", "text": "text", "visual": "video"}
    class_names = FOUR
    description = ("IEMOCAP utterances (speech, transcript, face video), 4 classes (hap+exc, sad, neu, ang) or 6; "
                   "from USC SAIL (IEMOCAP_full_release, by license). Random, session-disjoint or LOSO splits.")
    layout = ("Session<n>/dialog/EmoEvaluation/<dialog>.txt, dialog/transcriptions/<dialog>.txt, "
              "dialog/wav/<dialog>.wav, dialog/avi/DivX/<dialog>.avi; options classes=4|6, "
              "split=random|session|loso, test_session, val_session, seed, fractions (60/20/20), val_fraction, "
              "split_file")

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        self.class_names = SIX if parse_choice("classes", options.get("classes", "4"), ("4", "6")) == "6" else FOUR
        self.policy = SplitPolicy(self.name, options, self.data_root, choices=("random", "group", "loso"),
                                  fractions=(0.6, 0.2, 0.2), group="session", adapter_options=("classes",))
        self.sessions = sorted((d for d in self.data_root.iterdir() if d.is_dir() and _SESSION.match(d.name)),
                               key=lambda d: int(_SESSION.match(d.name)[1]))
        if not self.sessions:
            raise DatasetError(f"iemocap: no Session<n> folders in {self.data_root} (the IEMOCAP_full_release folder)")
        for session in self.sessions:
            if not (session / "dialog" / "EmoEvaluation").is_dir():
                raise DatasetError(f"iemocap: {session.name}/dialog/EmoEvaluation not found")

    def _label(self, label: str) -> int | None:
        if len(self.class_names) == 4 and label == "exc":
            label = "hap"
        return self.class_names.index(label) if label in self.class_names else None

    @staticmethod
    def _transcripts(path) -> tuple[dict[str, str], str]:
        """utterance -> text of one dialogue, or an empty dict and why."""
        try:
            text = read_text(path)
        except OSError as err:
            return {}, f"transcription {path.name} unreadable ({err.strerror or err})"
        lines = (_TRANSCRIPT.match(line.strip()) for line in text.splitlines())
        return {m[1]: m[2].strip() for m in lines if m}, ""

    def listing(self) -> DatasetListing:
        samples, skipped, sessions = [], [], {}
        scheme = ", ".join(self.class_names) + (" (exc merged into hap)" if len(self.class_names) == 4 else "")
        for session in self.sessions:
            dialog_dir = session / "dialog"
            for evaluation in sorted((dialog_dir / "EmoEvaluation").glob("*.txt")):
                if evaluation.name.startswith("."):
                    continue  # macOS resource forks (._name.txt) ship in some copies of the release
                dialog = evaluation.stem
                try:
                    lines = read_text(evaluation).splitlines()
                except OSError as err:
                    skipped.append(Skipped(dialog, f"evaluation file unreadable ({err.strerror or err})"))
                    continue
                transcripts, why_no_text = self._transcripts(dialog_dir / "transcriptions" / f"{dialog}.txt")
                wav, avi = dialog_dir / "wav" / f"{dialog}.wav", dialog_dir / "avi" / "DivX" / f"{dialog}.avi"
                media = "; ".join(f"{p.relative_to(session)} is {why}" for p in (wav, avi) if (why := file_problem(p)))
                for match in filter(None, (_EVAL.match(line) for line in lines)):
                    start, end, utterance, raw = float(match[1]), float(match[2]), match[3], match[4]
                    label = self._label(raw)
                    if label is None:
                        reason = f"label {raw!r} is outside the {len(self.class_names)}-class scheme {scheme}"
                    elif utterance in sessions:
                        reason = "utterance listed twice"
                    elif end <= start:
                        reason = f"empty time span [{start} - {end}]"
                    elif utterance not in transcripts:
                        reason = why_no_text or f"no line in transcriptions/{dialog}.txt"
                    elif not transcripts[utterance]:
                        reason = "empty transcript"
                    else:
                        reason = media
                    if reason:
                        skipped.append(Skipped(utterance, reason))
                        continue
                    sources = {"audio": str(wav), "text": transcripts[utterance], "visual": str(avi)}
                    samples.append(SampleRef(utterance, label, "", sources, window=(start, end)))
                    sessions[utterance] = session.name
        return self.policy.listing(samples, skipped, groups=sessions,
                                   normalize_group=lambda g: g if g.startswith("Session") else f"Session{g}")
