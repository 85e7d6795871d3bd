"""Stage two: heads trained on cached features (torch only; never imports ``pipeline``)."""
