"""Files shipped with the package: the embedded English sample corpus (see sample_corpus/README.md)."""
from pathlib import Path

SAMPLE_CORPUS = Path(__file__).parent / "sample_corpus"
