"""MVSA-Single: tweets with an image and a text, each side labelled positive / neutral / negative.

The release (the MVSA project page of Niu et al., MMM 2016) has ``data/<id>.jpg``, ``data/<id>.txt``
and ``labelResultAll.txt``: a header line, then ``<id>\\t<text label>,<image label>`` (4869 posts).
A post has one label only after a rule, and papers use two:

- rule A (default; Xu & Mao's MultiSentiNet convention): equal labels keep that label; one side
  neutral takes the other side's label; positive against negative is dropped -> 4511 posts;
- rule B: keep only posts whose text and image labels are equal -> 2592 posts.

Default split fractions follow each rule's papers: 80/10/10 for rule A, 60/20/20 for rule B (the
real data then give 1555/518/519). The text modality's source is the tweet itself, read here.
"""
from __future__ import annotations

from pipeline.datasets.base import DatasetAdapter, DatasetError, DatasetListing, SampleRef, Skipped
from pipeline.datasets.files import file_problem, read_text
from pipeline.datasets.policy import SplitPolicy, parse_choice

CLASSES = ["negative", "neutral", "positive"]
RULES = {"a": (0.8, 0.1, 0.1), "b": (0.6, 0.2, 0.2)}


def combine(text: str, image: str, rule: str) -> tuple[str | None, str]:
    """The post's label under ``rule`` ('a' or 'b'), or None and why it is dropped."""
    if text == image:
        return text, ""
    if rule == "b":
        return None, f"text label {text} differs from image label {image} (rule B keeps equal labels only)"
    if "neutral" in (text, image):
        return (image if text == "neutral" else text), ""
    return None, f"conflicting labels: text {text}, image {image} (rule A drops positive vs negative)"


class MVSASingle(DatasetAdapter):
    name = "mvsa"
    modalities = {"image": "image", "text": "text"}
    class_names = CLASSES
    description = ("MVSA-Single tweets (image + text), 3 sentiment classes; from the MVSA project page "
                   "(Multimodal Visual Sentiment Analysis, Niu et al. 2016). Options rule=A|B, split files.")
    layout = ("labelResultAll.txt (header, then ID<TAB>text_label,image_label), data/<ID>.jpg, data/<ID>.txt; "
              "options rule=A (4511 posts, 80/10/10) | B (2592, 60/20/20), seed, fractions, split_file, "
              "train_file+test_file, val_fraction")

    def __init__(self, data_root, **options):
        super().__init__(data_root, **options)
        self.rule = parse_choice("rule", options.get("rule", "A"), ("a", "b"))
        self.policy = SplitPolicy(self.name, options, self.data_root, choices=("random",), fractions=RULES[self.rule],
                                  adapter_options=("rule",))
        self.label_file = self.data_root / "labelResultAll.txt"
        if not self.label_file.is_file() or not (self.data_root / "data").is_dir():
            raise DatasetError(f"mvsa: labelResultAll.txt or data/ not found in {self.data_root} "
                               f"(the MVSA_Single folder)")

    def _label_lines(self, skipped: list[Skipped]) -> dict[str, tuple[str, str]]:
        """id -> (text label, image label); malformed lines, labels outside the scheme and ids listed
        twice with different labels go to ``skipped``."""
        found: dict[str, tuple[str, str]] = {}
        conflicting: dict[str, set] = {}
        for number, line in enumerate(read_text(self.label_file).splitlines(), start=1):
            if not line.strip() or (number == 1 and line.lower().startswith("id")):
                continue
            sid, _, labels = line.strip().partition("\t")
            parts = [p.strip().lower() for p in labels.split(",")]
            if not sid or len(parts) != 2:
                skipped.append(Skipped(sid.strip() or f"line-{number}", f"line {number} of labelResultAll.txt "
                                       f"is not ID<TAB>text,image: {line.strip()[:60]!r}"))
                continue
            outside = [p for p in parts if p not in CLASSES]
            if outside:
                skipped.append(Skipped(sid, f"label {outside[0]!r} is outside the scheme {'/'.join(CLASSES)}"))
                continue
            pair = (parts[0], parts[1])
            if sid in found and found[sid] != pair:
                conflicting.setdefault(sid, {found[sid]}).add(pair)
            found.setdefault(sid, pair)
        for sid, pairs in conflicting.items():
            del found[sid]
            shown = "; ".join(f"{t},{i}" for t, i in sorted(pairs))
            skipped.append(Skipped(sid, f"listed several times with different labels ({shown})"))
        return found

    def listing(self) -> DatasetListing:
        skipped: list[Skipped] = []
        samples = []
        for sid, (text_label, image_label) in self._label_lines(skipped).items():
            label, why = combine(text_label, image_label, self.rule)
            if label is None:
                skipped.append(Skipped(sid, why))
                continue
            image, text_file = self.data_root / "data" / f"{sid}.jpg", self.data_root / "data" / f"{sid}.txt"
            problem = file_problem(image)
            if problem:
                skipped.append(Skipped(sid, f"image data/{sid}.jpg is {problem}"))
                continue
            try:
                text = read_text(text_file).strip()
            except OSError as err:
                skipped.append(Skipped(sid, f"text data/{sid}.txt unreadable ({err.strerror or err})"))
                continue
            if not text:
                skipped.append(Skipped(sid, f"text data/{sid}.txt is empty"))
                continue
            samples.append(SampleRef(sid, CLASSES.index(label), "", {"image": str(image), "text": text}))
        listing = self.policy.listing(samples, skipped)
        listing.split_rule = f"rule {self.rule.upper()}; {listing.split_rule}"
        return listing
